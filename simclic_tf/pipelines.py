"""The tf.data pipelines that feed pretraining, fine-tuning and evaluation
from an image set (`simclic_tf.images`).

Pretraining draws whole batches in an order fixed by (seed, pass over the
data) alone, so that a run resumed at epoch k reads what an uninterrupted
run reads, and each replica (and worker) reads only its share of every
global batch (`pretrain_dataset`).
"""

import functools

import numpy as np
import tensorflow as tf

from simclic_tf.config import checked_value, flag
from simclic_tf.images import Images, ImageSet, ImageStream
from simclic_tf.sources import DataError

AUTOTUNE = tf.data.AUTOTUNE


def pretrain_dataset(images, batch_size, views, augment, seed=0, with_labels=False,
                     epochs=1, initial_epoch=0, steps_per_epoch=None, input_context=None,
                     shuffle_buffer=10_000):
    """Batches `(views, indices)` for pretraining epochs `initial_epoch` to
    `epochs` - 1, each of `steps_per_epoch` steps (default: one pass over the
    data), or `(views, indices, labels)` `with_labels` (the online probe).
    Train on it with `model.fit(dataset, epochs=epochs, initial_epoch=...,
    steps_per_epoch=...)`.

    `views` is a tuple of `views` (1 or 2) float32 batches (B, H, W, C) in [0, 1],
    each an independent draw of `augment` on the same images (or of the view's
    own, when `augment` is a tuple of one per view: a smaller second view);
    `indices` (B,) int32 are the images' stable indices (the history bank's keys).

    The run is a stream of passes over the data, `len(images) // batch_size`
    whole global batches each, epochs cut from it by `steps_per_epoch`: pass p
    is a permutation of the indices drawn by `stateless_shuffle` from (seed, p)
    alone (`pass_order`), so an epoch's batches do not depend on where the run
    (re)started, and every index comes at most once a pass. A set read front
    to back (`random_access` False) is read in windows of `shuffle_buffer`
    images instead, each in its own order drawn from (seed, p, window). With
    `input_context` (tf.distribute's, see `distribute_pretraining`) the
    dataset holds this input pipeline's replicas' shares of every global
    batch, in replica order: the batch each replica trains on is its slice of
    the one a single device would see (`ReplicaShare`).

    `images` is a `simclic_tf.images.Images`, a uint8 array (N, H, W, C), or a
    finite `tf.data.Dataset` of single images (uint8, or floats in [0, 1])
    that yields them in the same order every time: its i-th image is index i.
    """
    views = checked_value("views", views)
    augments = tuple(augment) if isinstance(augment, (tuple, list)) else (augment,) * views
    if len(augments) != views:
        raise ValueError(f"{len(augments)} augmentations for {views} views: give one, or "
                         "one per view")
    images = as_images(images)
    if with_labels and images.labels is None:
        raise DataError(f"{flag('online_probe')} needs labels; the training set has none "
                        "(pass a labelled --dataset)")
    check_batch_size(batch_size, len(images))
    steps_per_pass = len(images) // batch_size
    steps_per_epoch = steps_per_epoch or steps_per_pass
    first, last = initial_epoch * steps_per_epoch, epochs * steps_per_epoch
    share = ReplicaShare(batch_size, input_context or tf.distribute.InputContext())
    if images.random_access:
        one_pass = functools.partial(pass_index_batches, len(images), batch_size, share, seed)
    else:
        one_pass = functools.partial(pass_streamed_batches, images, batch_size, share, seed,
                                     shuffle_buffer)
    passes = tf.data.Dataset.range(first // steps_per_pass, (last - 1) // steps_per_pass + 1)
    batches = (passes.flat_map(one_pass).skip(first % steps_per_pass * share.local)
               .take((last - first) * share.local))
    if images.random_access:
        batches = images.read(batches, share.per_replica)
    labels = tf.constant(images.labels, tf.int32) if with_labels else None
    batches = batches.map(functools.partial(make_views, augments, labels),
                          num_parallel_calls=AUTOTUNE)
    return batches.apply(tf.data.experimental.assert_cardinality(
        (last - first) * share.local)).prefetch(AUTOTUNE)


class ReplicaShare:
    """This input pipeline's share of every global batch (`context`, a
    tf.distribute.InputContext): the slices of its `local` replicas, of
    `per_replica` images each, in replica order."""

    def __init__(self, batch_size, context):
        self.per_replica = context.get_per_replica_batch_size(batch_size)
        self.local = context.num_replicas_in_sync // context.num_input_pipelines
        self.positions = (context.input_pipeline_id * self.local * self.per_replica
                          + tf.range(self.local * self.per_replica, dtype=tf.int64))

    def slices(self, *global_batches):
        """Global batches (steps, B, ...) as this pipeline's per-replica batches
        (steps * local, per_replica, ...)."""
        return tuple(self._slice(values) for values in global_batches)

    def _slice(self, values):
        values = tf.gather(values, self.positions, axis=1)
        return tf.reshape(values, (-1, self.per_replica, *values.shape[2:]))


def pass_order(count, seed, number):
    """The permutation of the indices 0..count-1 that pass `number` visits: a
    function of (seed, number) alone, so a resumed run draws it again.
    (index_shuffle, which needs no N-sized tensor, gave permutations the
    default job did not learn from: kNN 22.5 % against 46.8 %.)"""
    return tf.random.experimental.stateless_shuffle(
        tf.range(count, dtype=tf.int64), tf.stack([tf.constant(seed, tf.int64), number]))


def pass_index_batches(count, batch_size, share, seed, number):
    """Pass `number` over a random-access set of `count` images: this
    pipeline's per-replica index batches of its `count // batch_size` global
    batches."""
    steps = count // batch_size
    order = pass_order(count, seed, number)[:steps * batch_size]
    (indices,) = share.slices(tf.reshape(order, (steps, batch_size)))
    return tf.data.Dataset.from_tensor_slices(indices)


def pass_streamed_batches(images, batch_size, share, seed, window_size, number):
    """Pass `number` over a set read front to back: `(indices, pixels)`
    per-replica batches of global batches cut from windows of `window_size`
    images, each window in its own order (`permute_window`)."""
    permute = functools.partial(permute_window, seed, number)
    return (images.stream().enumerate().batch(window_size).enumerate()
            .map(permute).unbatch()
            .batch(batch_size, drop_remainder=True)
            .map(lambda indices, pixels: share.slices(indices[None], pixels[None]))
            .unbatch())


def permute_window(seed, number, window, images):
    """Window `window` of pass `number`, `(indices, pixels)`, in a stateless
    order drawn from (seed, number, window): Dataset.shuffle takes no tensor
    seed when a global seed is set."""
    indices, pixels = images
    order = tf.random.experimental.stateless_shuffle(
        tf.range(tf.shape(indices)[0]),
        tf.random.experimental.stateless_fold_in(
            tf.stack([tf.constant(seed, tf.int64), number]), window))
    return tf.gather(indices, order), tf.gather(pixels, order)


def make_views(augments, labels, indices, pixels):
    """A training element: a view drawn by each of `augments` on the pixels
    (uint8, or floats already in [0, 1]) as float32 in [0, 1], the int32
    indices, and with `labels` (the online probe's) the batch's labels."""
    batch = tf.cast(pixels, tf.float32)
    if pixels.dtype == tf.uint8:
        batch = batch / 255.0
    element = (tuple(draw(batch) for draw in augments), tf.cast(indices, tf.int32))
    return element if labels is None else element + (tf.gather(labels, indices),)


def distribute_pretraining(strategy, images, batch_size, **kwargs):
    """`pretrain_dataset` for `strategy`: with several replicas, built per input
    pipeline (worker) by `distribute_datasets_from_function`, so that each
    worker reads only its replicas' images; else the plain dataset."""
    if strategy.num_replicas_in_sync == 1:
        return pretrain_dataset(images, batch_size, **kwargs)
    return strategy.distribute_datasets_from_function(
        lambda context: pretrain_dataset(images, batch_size, input_context=context, **kwargs))


def as_images(images):
    """An `Images` for what `pretrain_dataset` and `eval_dataset` accept."""
    if isinstance(images, Images):
        return images
    if isinstance(images, tf.data.Dataset):
        spec = images.element_spec
        if not isinstance(spec, tf.TensorSpec) or spec.shape.rank != 3:
            raise DataError(f"a tf.data.Dataset of images yields single images (H, W, C); "
                            f"this one yields {spec}")
        return ImageStream(lambda: images, dataset_size(images), None, [], spec.shape,
                           spec.dtype)
    return ImageSet(np.asarray(images), None, [])


def check_batch_size(batch_size, count):
    if batch_size > count:
        raise DataError(
            f"{flag('batch_size')} {batch_size} is larger than the dataset "
            f"({count} images), so an epoch has no whole batch; accepted: 2 to {count}")


def dataset_size(dataset):
    """N, the number of images of a finite tf.data.Dataset (the history bank's rows)."""
    count = int(dataset.cardinality())
    if count < 0:
        raise DataError(
            "the tf.data.Dataset of images has an unknown or infinite size, and the "
            "history bank needs N; pass a finite dataset, or state N with "
            "dataset.apply(tf.data.experimental.assert_cardinality(N))")
    return count


def shuffled_batches(images, batch_size, make_batch, seed=None):
    """Whole batches of `images` in a new random order every time the dataset
    is iterated (fine-tuning's input), each `(indices, uint8 pixels)` turned
    into a training batch by `make_batch` in a parallel map. A random-access
    set shuffles its indices, not its images, which keeps the buffer small."""
    if images.random_access:
        indices = (tf.data.Dataset.range(len(images))
                   .shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
                   .batch(batch_size, drop_remainder=True))
        batches = images.read(indices, batch_size)
    else:
        batches = (images.stream().enumerate().shuffle(10_000, seed=seed)
                   .batch(batch_size, drop_remainder=True))
    return batches.map(make_batch, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def eval_dataset(images, batch_size):
    """float32 batches in [0, 1] of `images` (an `Images` or a uint8 array) in
    order, the last one possibly smaller."""
    return (as_images(images).batches(batch_size)
            .map(lambda pixels: tf.cast(pixels, tf.float32) / 255.0, AUTOTUNE)
            .prefetch(AUTOTUNE))
