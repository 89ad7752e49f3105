"""Datasets by name, and the tf.data pipelines that feed pretraining and evaluation.

A dataset name is one of (`DATA_SOURCES`, one class each):
- `digits`: scikit-learn's handwritten digits, 1,797 8x8 grey images; no download;
- `npz:PATH`: arrays `x` (uint8, N x H x W x C, or N x H x W for grey), optional
  `y` (integer labels) and `class_names`;
- `dir:PATH`: one subfolder of images per class (class index = sorted folder
  names), or images directly in PATH (unlabeled);
- any other name: a tensorflow-datasets dataset (or `tfds:NAME`), read from
  `--data-dir` and downloaded there if it is not prepared yet.

A dataset opens as an image set with stable indices (`simclic_tf.images`):
a folder as its file list, decoded a batch at a time; an uncompressed .npz
memory-mapped; tensorflow-datasets from its prepared files. `load_images`
then keeps it so (`storage="stream"`), decodes it into memory ("memory"), or
chooses by its decoded size ("auto": memory up to `MEMORY_LIMIT`).

Pretraining draws whole batches in an order fixed by (seed, pass over the
data) alone, so that a run resumed at epoch k reads what an uninterrupted
run reads, and each replica (and worker) reads only its share of every
global batch (`pretrain_dataset`).
"""

import contextlib
import logging
import os
import socket
import zipfile
from pathlib import Path

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

from simclic_tf.config import flag
from simclic_tf.images import (ImageFiles, ImageSet, Images, ImageStream, MappedArray,
                               memory_map_npz)
from simclic_tf.registry import Registry

DATA_SOURCES = Registry("data source")
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
AUTOTUNE = tf.data.AUTOTUNE
# tensorflow-datasets' mirror, which it tries first for every download.
DOWNLOAD_HOST = ("storage.googleapis.com", 443)
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
STORAGES = ("auto", "memory", "stream")
# "auto" decodes a set into memory up to this size: reading it is then a gather.
MEMORY_LIMIT = 2 ** 30

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset cannot be read or used; the message names the input at fault."""


class DataSource:
    """One way of naming a dataset; a new one is a subclass registered in DATA_SOURCES.

    `usage` is how it is spelled ("npz:PATH"); when it `takes_argument`, the part
    after the colon is the argument given to `load` and `test_split`.
    """

    usage = ""
    takes_argument = True

    def load(self, argument, split, data_dir, size):
        """The image set (`simclic_tf.images`) of `split`, opened without decoding
        it where the format allows; `size`, (height, width) or None, may be
        honoured (the caller resizes whatever comes back at another size)."""
        raise NotImplementedError

    def test_split(self, argument, data_dir):
        """The name of the split to evaluate on, or None when there is none."""
        return None

    def check_single_split(self, name, split):
        if split != "train":
            raise DataError(
                f"{name!r} is one set with no {split!r} split; evaluation holds out "
                f"{flag('test_fraction')} of it, or pass {flag('eval_dataset')}"
            )


@DATA_SOURCES.register("digits")
class Digits(DataSource):
    """scikit-learn's 1,797 handwritten digits: 8x8 grey, values 0..16 scaled to 0..255."""

    usage = "digits"
    takes_argument = False

    def load(self, argument, split, data_dir, size):
        self.check_single_split("digits", split)
        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
        return ImageSet(images, digits.target.astype(np.int64), [str(i) for i in range(10)])


@DATA_SOURCES.register("shapes")
class Shapes(DataSource):
    """Ten classes of shapes (disc, square, triangle, ...) drawn on the fly by
    NumPy: no file, no download, the same images for a seed on every machine.

    The embedded default dataset. Each image has its own position, size,
    rotation, brightness, background gradient and pixel noise, so a random
    ResNet's features group images by those nuisances (kNN about 27 % at
    16 px) and pretraining has invariances to learn: a main job that shows
    learning in minutes on a CPU. The 8x8 `digits` cannot: a random ResNet
    already reaches 84 % kNN on them.
    """

    usage = "shapes"
    takes_argument = False
    class_names = ["disc", "square", "triangle", "ring", "plus", "diamond", "bar",
                   "star", "half-disc", "frame"]
    counts = {"train": 3000, "test": 1000}
    side = 16

    def load(self, argument, split, data_dir, size):
        if split not in self.counts:
            raise DataError(f"'shapes' has the splits {sorted(self.counts)}, not {split!r}")
        height, width = size or (self.side, self.side)
        images, labels = draw_shapes(self.counts[split], height, width,
                                     seed=sorted(self.counts).index(split))
        return ImageSet(images, labels, list(self.class_names))

    def test_split(self, argument, data_dir):
        return "test"


def shape_masks(u, v):
    """Whether each point (u, v), in the shape's own frame scaled to its radius,
    lies inside each of the ten shapes, in `Shapes.class_names` order."""
    r, box = np.hypot(u, v), np.maximum(abs(u), abs(v))
    return [r < 1, box < 0.8, (v > -0.5) & (abs(u) < (1 - v) * 0.577),
            (r > 0.55) & (r < 1), ((abs(u) < 0.3) | (abs(v) < 0.3)) & (box < 1),
            abs(u) + abs(v) < 1, (abs(u) < 1) & (abs(v) < 0.35),
            r < 0.6 + 0.4 * np.cos(5 * np.arctan2(v, u)), (r < 1) & (v > 0),
            (box < 0.85) & (box > 0.5)]


def draw_shapes(count, height, width, seed):
    """(uint8 images (count, height, width, 3), int64 labels), classes balanced.
    Shapes are rendered at twice the size and averaged down, for soft edges."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % len(Shapes.class_names))
    side = min(height, width)

    def draw(*shape, low=0.0, high=1.0):
        return rng.uniform(low, high, (count,) + shape)

    centre = draw(2, 1, 1, low=0.3, high=0.7) * np.array([width, height])[:, None, None]
    radius = draw(1, 1, low=0.2, high=0.4) * side
    angle = draw(1, 1, low=-0.3, high=0.3)
    ys, xs = np.meshgrid((np.arange(2 * height) + 0.5) / 2, (np.arange(2 * width) + 0.5) / 2,
                         indexing="ij")
    dx, dy = xs - centre[:, 0], ys - centre[:, 1]
    u = (np.cos(angle) * dx + np.sin(angle) * dy) / radius
    v = (np.cos(angle) * dy - np.sin(angle) * dx) / radius
    inside = np.zeros(u.shape, np.float32)
    for label, mask in enumerate(shape_masks(u, v)):
        rows = labels == label
        inside[rows] = mask[rows]
    coverage = inside.reshape(count, height, 2, width, 2).mean(axis=(2, 4))[..., None]
    # A light shape on a dark, shaded background, both tinted alike: brightness,
    # contrast and tint vary within the colour jitter's range, so that colour
    # tells one image from another no better than the augmentation allows.
    tint = draw(1, 1, 3, low=0.8, high=1.2)
    foreground = draw(1, 1, 1, low=0.6, high=0.95) * tint
    background = draw(1, 1, 1, low=0.05, high=0.4) * tint
    direction = draw(1, 1, high=2 * np.pi)
    ramp = (np.cos(direction) * (xs[::2, ::2] / width - 0.5)
            + np.sin(direction) * (ys[::2, ::2] / height - 0.5))
    background = background * (1 + draw(1, 1, high=0.8) * ramp)[..., None]
    pixels = coverage * foreground + (1 - coverage) * background
    pixels += rng.normal(0, 0.05, pixels.shape)
    return (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.int64)


@DATA_SOURCES.register("npz")
class Npz(DataSource):
    """A NumPy .npz: `x` uint8 (N, H, W, C) or (N, H, W), optional `y` and `class_names`."""

    usage = "npz:PATH"
    expected = ("arrays x (uint8, N x H x W x C with C 1 or 3, or N x H x W), "
                "optional y (integer labels 0..K-1, length N) and class_names")

    def load(self, path, split, data_dir, size):
        name = f"npz:{path}"
        self.check_single_split(name, split)
        try:
            # No pickle: an .npz must not be able to run code.
            with np.load(path) as arrays:
                found = {key: arrays[key] for key in ("y", "class_names") if key in arrays.files}
                if "x" in arrays.files:  # Mapped, or read whole when compressed.
                    found["x"] = memory_map_npz(path)
                    if found["x"] is None:
                        found["x"] = arrays["x"]
        except (OSError, ValueError, AttributeError, zipfile.BadZipFile) as error:
            raise DataError(
                f"{name!r}: cannot read it as an .npz without pickle ({error}); "
                f"expected a file written by np.savez with {self.expected}"
            ) from None
        if "x" not in found:
            raise DataError(f"{name!r} has no array 'x'; expected {self.expected}")
        images = found["x"]
        if images.dtype != np.uint8:
            raise DataError(
                f"{name!r}: array 'x' has dtype {images.dtype}; expected uint8 pixels "
                "0..255 (floats in [0, 1]: save (x * 255).round().astype('uint8'))"
            )
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
            raise DataError(
                f"{name!r}: array 'x' has shape {images.shape}; expected N x H x W x C "
                "with N > 0 and C 1 (grey) or 3 (RGB), or N x H x W"
            )
        def image_set(labels, class_names):
            if isinstance(images, np.memmap):
                return MappedArray(images, labels, class_names)
            return ImageSet(images, labels, class_names)

        if "y" not in found:
            return image_set(None, [])
        labels = found["y"]
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{name!r}: array 'y' has shape {labels.shape} and dtype {labels.dtype}; "
                f"expected integer labels of shape ({len(images)},), one per image of 'x'"
            )
        if labels.min() < 0:
            raise DataError(f"{name!r}: array 'y' has negative labels; expected 0..K-1")
        num_classes = int(labels.max()) + 1
        class_names = [str(i) for i in range(num_classes)]
        if "class_names" in found:
            class_names = [str(c) for c in found["class_names"]]
            if len(class_names) < num_classes:
                raise DataError(
                    f"{name!r}: array 'class_names' has {len(class_names)} names but "
                    f"'y' has labels up to {num_classes - 1}; expected one name per class"
                )
        return image_set(labels.astype(np.int64), class_names)


@DATA_SOURCES.register("dir")
class Directory(DataSource):
    """A folder of images: one subfolder per class, or the images directly (unlabeled).

    As Keras's `image_dataset_from_directory`: every subfolder is a class, class
    index = position in the sorted folder names, and with subfolders present
    files directly in PATH are ignored. Images (by extension: BMP, GIF, JPEG,
    PNG, searched recursively) are decoded when read, in a parallel tf.data
    map, with the channels (grey or RGB) and, unless `size` is given, the size
    of the first image that decodes (sorted order). A file that does not
    decode is skipped. A folder where nothing decodes is an error.
    """

    usage = "dir:PATH"

    def load(self, path, split, data_dir, size):
        name = f"dir:{path}"
        self.check_single_split(name, split)
        root = Path(path)
        if not root.is_dir():
            raise DataError(f"{name!r}: no such folder; expected a folder with one "
                            "subfolder of images per class, or the images themselves")
        class_dirs = sorted(d for d in root.iterdir()
                            if d.is_dir() and not d.name.startswith("."))
        if class_dirs:
            files, labels = [], []
            for label, class_dir in enumerate(class_dirs):
                found = _image_files(class_dir)
                files += found
                labels += [label] * len(found)
            labels, class_names = np.array(labels, np.int64), [d.name for d in class_dirs]
        else:
            files, labels, class_names = _image_files(root), None, []
        if not files:
            raise DataError(f"{name!r} holds no image files "
                            f"({', '.join(IMAGE_EXTENSIONS)}), in it or in its subfolders")
        return ImageFiles(files, labels, class_names, _first_image_shape(files, size, name))


@DATA_SOURCES.register("tfds")
class TFDS(DataSource):
    """A tensorflow-datasets dataset: features "image" and (if labelled) "label"."""

    usage = "tfds:NAME"  # or NAME alone, when no other source claims it

    def load(self, name, split, data_dir, size):
        builder = self.builder(name, data_dir)
        features = builder.info.features
        if "image" not in features:
            raise DataError(f"{name!r} has no 'image' feature; features: {list(features)}")
        if size is None and None in features["image"].shape[:2]:
            raise DataError(f"{name!r} has images of varying size; choose one with "
                            f"{flag('image_size')}")
        # One pass over the prepared files, images left undecoded: N and the labels.
        import tensorflow_datasets as tfds

        labelled = "label" in features
        try:
            undecoded = builder.as_dataset(split=split, shuffle_files=False,
                                           decoders={"image": tfds.decode.SkipDecoding()})
        except (ValueError, KeyError) as error:
            raise DataError(f"{name!r} has no split {split!r} ({error}); its splits: "
                            f"{', '.join(builder.info.splits) or 'unknown'}") from None
        labels = np.fromiter(undecoded.map(
            lambda example: example["label"] if labelled else tf.constant(-1, tf.int64),
            AUTOTUNE).as_numpy_iterator(), np.int64)
        if not len(labels):
            raise DataError(f"{name!r}: split {split!r} is empty")
        count, labels, class_names = len(labels), (labels if labelled else None), []
        if labelled:
            class_names = list(getattr(features["label"], "names", None)
                               or [str(i) for i in range(labels.max() + 1)])
        height, width, channels = features["image"].shape
        shape = (*(size or (height, width)), channels)

        def read():  # ImageStream.stream resizes what comes at another size.
            examples = builder.as_dataset(split=split, shuffle_files=False)
            return examples.map(lambda example: example["image"], AUTOTUNE)

        return ImageStream(read, count, labels, class_names, shape)

    def test_split(self, name, data_dir):
        """"test", else "validation" (ImageNet's evaluation split), else None."""
        splits = self.builder(name, data_dir).info.splits
        return next((s for s in ("test", "validation") if s in splits), None)

    def builder(self, name, data_dir):
        """The prepared builder; downloads and prepares it on first use."""
        # Imported here: tensorflow_datasets is slow to import and only this source needs it.
        import tensorflow_datasets as tfds

        local_forms = ", ".join(DATA_SOURCES.get(n).usage for n in DATA_SOURCES.names()
                                if n != "tfds")
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except ValueError:  # DatasetNotFoundError, or not even a valid name
            hint = (f"; {name!r} exists on disk: did you mean dir:{name} or npz:{name}?"
                    if os.path.exists(name) else "")
            raise DataError(f"{name!r} is neither a local form ({local_forms}) nor a "
                            f"tensorflow-datasets name{hint}") from None
        if not builder.is_prepared():
            reason = unreachable(DOWNLOAD_HOST)
            try:
                if reason:
                    raise ConnectionError(reason)
                builder.download_and_prepare()
            except Exception as error:  # offline, blocked, missing manual files, ...
                where = data_dir or "the default ~/tensorflow_datasets"
                raise DataError(
                    f"{name!r} is not prepared in {where} and could not be downloaded "
                    f"({type(error).__name__}: {error}). On a machine with internet run "
                    f"`tfds build {name} --data_dir DIR`, copy DIR here and pass "
                    f"{flag('data_dir')} DIR; or give the images as dir:PATH (one folder "
                    "per class) or npz:PATH (arrays x, y)"
                ) from error
        return builder


def unreachable(address, timeout=5.0):
    """Why (host, port) cannot be reached, or None when it can or a proxy is
    set (then only the download itself can tell). Asked before a download:
    offline, tensorflow-datasets retries ten times with backoff, about 3.5
    minutes, before it gives up."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    try:
        socket.create_connection(address, timeout=timeout).close()
    except OSError as error:
        return f"cannot reach {address[0]}: {error}"
    return None


def load_images(name, split="train", data_dir=None, image_size=None, storage="auto"):
    """The image set named `name` (see the module docstring), resized to
    `image_size` (a side length or a (height, width) pair) when it is given,
    in `storage`: "memory" (an `ImageSet`), "stream" (read from disk when a
    batch asks) or "auto" (memory when it decodes to `MEMORY_LIMIT` or less)."""
    if storage not in STORAGES:
        raise DataError(f"{flag('data_storage')} {storage!r} is not accepted; choose one "
                        f"of: {', '.join(STORAGES)}")
    source, argument = _resolve(name)
    size = _size(image_size)
    images = source.load(argument, split, data_dir, size)
    if size is not None and tuple(images.image_shape[:2]) != size:
        images = images.resized(size)
    if storage == "memory" or (storage == "auto" and images.nbytes <= MEMORY_LIMIT):
        return to_memory(images, name)
    return images


def to_memory(images, name):
    """`images` decoded into an `ImageSet`; files that do not decode are left
    out, with one warning line that counts them and names the first few."""
    if isinstance(images, ImageSet):
        return images
    # Filled in place: one decoded copy, not a list of batches and their concatenation.
    pixels = np.empty((len(images), *images.image_shape), np.uint8)
    decoded = np.zeros(len(images), bool)
    if images.random_access:
        batches = images.read(tf.data.Dataset.range(len(images)).batch(1024), 1024)
    else:
        batches = images.stream().enumerate().batch(1024)
    for indices, batch in batches.as_numpy_iterator():
        pixels[indices] = batch
        decoded[indices] = True
    positions = np.flatnonzero(decoded)
    failed = np.flatnonzero(~decoded)
    if len(failed):
        pixels = pixels[positions]
        paths = getattr(images, "paths", None)
        named = "" if paths is None else ": " + ", ".join(paths[i] for i in failed[:3]) + (
            ", ..." if len(failed) > 3 else "")
        logger.warning("%s: skipped %d of %d image files that do not decode%s",
                       name, len(failed), len(images), named)
    labels = None if images.labels is None else images.labels[positions]
    return ImageSet(pixels, labels, images.class_names)


def load_train_and_eval(config):
    """The pretraining set and the labelled set evaluation reports on.

    The evaluation set is `config.eval_dataset` (its test split if it has one,
    else all of it), else the dataset's own test split, else a held-out
    `test_fraction` of the dataset (stratified by label, `seed`). It is resized
    to the training images' size.
    """
    test_split, storage = None, config.data_storage
    with _blame("dataset"):
        train = load_images(config.dataset, "train", config.data_dir, config.image_size,
                            storage)
        size = train.image_shape[:2]
        if not config.eval_dataset:
            source, argument = _resolve(config.dataset)
            test_split = source.test_split(argument, config.data_dir)
        if test_split:
            evaluation = load_images(config.dataset, test_split, config.data_dir, size,
                                     storage)
    if config.eval_dataset:
        with _blame("eval_dataset"):
            source, argument = _resolve(config.eval_dataset)
            split = source.test_split(argument, config.data_dir) or "train"
            evaluation = load_images(config.eval_dataset, split, config.data_dir, size,
                                     storage)
    elif not test_split:
        train, evaluation = _hold_out(train, config)
    if evaluation.labels is None:
        name = config.eval_dataset or f"{config.dataset}, split {test_split}"
        raise DataError(
            f"{flag('eval_dataset')}: the evaluation set ({name}) has no labels; pass a "
            "labelled set: dir:PATH with one folder per class, npz:PATH with y, or a "
            "labelled tensorflow-datasets name"
        )
    present = np.unique(evaluation.labels)
    if len(present) < 2:
        name = config.eval_dataset or config.dataset
        raise DataError(
            f"{flag('eval_dataset')}: the evaluation set ({name}) holds a single class "
            f"(label {present[0]}), so every kNN and linear prediction would be right; pass "
            "a labelled set of two classes or more")
    if evaluation.image_shape[-1] != train.image_shape[-1]:
        raise DataError(
            f"{flag('eval_dataset')}: the evaluation images have "
            f"{evaluation.image_shape[-1]} channels and the training images "
            f"{train.image_shape[-1]}; expected the same"
        )
    return train, evaluation


def pretrain_dataset(images, batch_size, views, augment, seed=0, with_labels=False,
                     epochs=1, initial_epoch=0, steps_per_epoch=None, input_context=None,
                     shuffle_buffer=10_000):
    """Batches `(views, indices)` for pretraining epochs `initial_epoch` to
    `epochs` - 1, each of `steps_per_epoch` steps (default: one pass over the
    data), or `(views, indices, labels)` `with_labels` (the online probe).
    Train on it with `model.fit(dataset, epochs=epochs, initial_epoch=...,
    steps_per_epoch=...)`.

    `views` is a tuple of `views` (1 or 2) float32 batches (B, H, W, C) in [0, 1],
    each an independent draw of `augment` on the same images; `indices` (B,)
    int32 are the images' stable indices (the history bank's keys).

    The run is a stream of passes over the data, `len(images) // batch_size`
    whole global batches each, epochs cut from it by `steps_per_epoch`: pass p
    is a permutation of the indices drawn by `stateless_shuffle` from (seed, p)
    alone, so an epoch's batches do not depend on where the run (re)started,
    and every index comes at most once a pass. A set read front to back
    (`random_access` False) is read in windows of `shuffle_buffer` images
    instead, each in its own order drawn from (seed, p, window). With
    `input_context` (tf.distribute's, see `distribute_pretraining`) the
    dataset holds this input pipeline's replicas' shares of every global
    batch, in replica order: the batch each replica trains on is its slice of
    the one a single device would see.

    `images` is a `simclic_tf.images.Images`, a uint8 array (N, H, W, C), or a
    finite `tf.data.Dataset` of single images (uint8, or floats in [0, 1])
    that yields them in the same order every time: its i-th image is index i.
    """
    if views not in (1, 2):
        raise ValueError(f"{flag('views')} {views} is not accepted; choose 1 or 2")
    images = as_images(images)
    if with_labels and images.labels is None:
        raise DataError(f"{flag('online_probe')} needs labels; the training set has none "
                        "(pass a labelled --dataset)")
    check_batch_size(batch_size, len(images))
    steps_per_pass = len(images) // batch_size
    steps_per_epoch = steps_per_epoch or steps_per_pass
    first, last = initial_epoch * steps_per_epoch, epochs * steps_per_epoch
    context = input_context or tf.distribute.InputContext()
    per_replica = context.get_per_replica_batch_size(batch_size)
    local = context.num_replicas_in_sync // context.num_input_pipelines
    # This pipeline's replicas' positions in every global batch, in order.
    share = (context.input_pipeline_id * local * per_replica
             + tf.range(local * per_replica, dtype=tf.int64))
    key = tf.constant(seed, tf.int64)

    def replica_slices(indices, *more):
        """Global batches (steps, B, ...) as this pipeline's per-replica batches."""
        def slices(values):
            values = tf.gather(values, share, axis=1)
            return tf.reshape(values, (-1, per_replica, *values.shape[2:]))
        return tuple(slices(values) for values in (indices, *more))

    if images.random_access:
        def one_pass(number):
            # Stateless: the permutation of pass p depends on (seed, p) alone.
            # (index_shuffle, which needs no N-sized tensor, gave permutations
            # the default job did not learn from: kNN 22.5 % against 46.8 %.)
            order = tf.random.experimental.stateless_shuffle(
                tf.range(len(images), dtype=tf.int64), tf.stack([key, number]))
            steps = tf.reshape(order[:steps_per_pass * batch_size], (steps_per_pass, batch_size))
            return tf.data.Dataset.from_tensor_slices(replica_slices(steps)[0])
    else:
        def one_pass(number):
            # Each window of `shuffle_buffer` images in a stateless order from
            # (seed, pass, window): Dataset.shuffle takes no tensor seed when a
            # global seed is set.
            def permute(window, indices, pixels):
                order = tf.random.experimental.stateless_shuffle(
                    tf.range(tf.shape(indices)[0]),
                    tf.random.experimental.stateless_fold_in(tf.stack([key, number]), window))
                return tf.gather(indices, order), tf.gather(pixels, order)

            return (images.stream().enumerate().batch(shuffle_buffer).enumerate()
                    .map(lambda window, batch: permute(window, *batch)).unbatch()
                    .batch(batch_size, drop_remainder=True)
                    .map(lambda i, x: replica_slices(i[None], x[None])).unbatch())

    passes = tf.data.Dataset.range(first // steps_per_pass, (last - 1) // steps_per_pass + 1)
    batches = (passes.flat_map(one_pass).skip(first % steps_per_pass * local)
               .take((last - first) * local))
    if images.random_access:
        batches = images.read(batches, per_replica)
    labels = tf.constant(images.labels if with_labels else [], tf.int32)

    def make_views(indices, pixels):
        pixels = tf.cast(pixels, tf.float32)
        batch = pixels / 255.0 if images.dtype == tf.uint8 else pixels
        element = (tuple(augment(batch) for _ in range(views)), tf.cast(indices, tf.int32))
        return element + (tf.gather(labels, indices),) if with_labels else element

    batches = batches.map(make_views, num_parallel_calls=AUTOTUNE)
    return batches.apply(tf.data.experimental.assert_cardinality(
        (last - first) * local)).prefetch(AUTOTUNE)


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


def _resolve(name):
    """The source instance and its argument for a dataset name."""
    prefix, colon, argument = name.partition(":")
    if colon and prefix in DATA_SOURCES:
        kind = prefix
    elif name in DATA_SOURCES:
        kind, argument = name, None
    else:
        return DATA_SOURCES.get("tfds")(), name
    source = DATA_SOURCES.get(kind)()
    if source.takes_argument != bool(argument):
        raise DataError(f"{name!r} is not accepted; write {source.usage}")
    return source, argument


@contextlib.contextmanager
def _blame(field):
    """Prefixes the DataErrors raised inside with the flag whose value caused them."""
    try:
        yield
    except DataError as error:
        raise DataError(f"{flag(field)} {error}") from error


def _hold_out(data, config):
    """(rest, held-out labelled `test_fraction`), stratified by label, rows kept in order."""
    if data.labels is None:
        raise DataError(
            f"{flag('eval_dataset')} is needed: {config.dataset!r} has no labels and no "
            "test split, so no labelled evaluation set can be held out of it; pass a "
            "labelled set: dir:PATH with one folder per class, npz:PATH with y, or a "
            "labelled tensorflow-datasets name"
        )
    try:
        return data.stratified_split(config.test_fraction, config.seed)
    except ValueError as error:
        raise DataError(
            f"{flag('test_fraction')} {config.test_fraction} cannot hold out a stratified "
            f"set of {config.dataset!r} ({len(data)} images, {data.num_classes} classes): "
            f"{error}; change {flag('test_fraction')} or pass {flag('eval_dataset')}"
        ) from None


def _size(image_size):
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)):
        return (int(image_size), int(image_size))
    return tuple(int(side) for side in image_size)


def _image_files(folder):
    return sorted(str(p) for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _first_image_shape(files, size, name):
    """(height, width, channels) of the first of `files` that decodes (height
    and width from `size` when given), reading no more files than it must."""
    def probe(path):
        image = tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
        return tf.shape(image)

    shapes = tf.data.Dataset.from_tensor_slices(files).map(probe).ignore_errors()
    first = next(iter(shapes.take(1)), None)
    if first is None:
        raise DataError(f"{name!r}: none of its {len(files)} image files decodes "
                        f"(first: {files[0]}); expected BMP, GIF, JPEG or PNG images")
    height, width, channels = first.numpy().tolist()
    return (*(size or (height, width)), 1 if channels in (1, 2) else 3)
