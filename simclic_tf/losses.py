"""The distance D(p, t) between a prediction and its target, averaged over
the batch. No function stops gradients: the model decides that. A loss with
a knob takes it as a keyword argument named as the config's knob
(`build_distance`)."""

import functools
import inspect

import tensorflow as tf
from keras import ops

from simclic_tf import distribute
from simclic_tf.registry import LOSSES


def build_distance(config):
    """The run's D(p, t): the loss `config.loss`, given the config's values
    of the knobs it takes (nt_xent's `temperature`)."""
    distance = LOSSES.get(config.loss)
    knobs = list(inspect.signature(distance).parameters)[2:]
    return functools.partial(distance, **{name: getattr(config, name) for name in knobs})


@LOSSES.register("cosine")
def negative_cosine(p, t):
    """-cos(p, t): SimSiam's loss, in [-1, 1]."""
    p = ops.normalize(ops.cast(p, "float32"), axis=-1)
    t = ops.normalize(ops.cast(t, "float32"), axis=-1)
    return -ops.mean(ops.sum(p * t, axis=-1))


@LOSSES.register("cross_entropy")
def cross_entropy(p, t):
    """-softmax(t) . log_softmax(p): the SimSiam paper's alternative."""
    p = ops.cast(p, "float32")
    t = ops.cast(t, "float32")
    return -ops.mean(ops.sum(ops.softmax(t, axis=-1) * ops.log_softmax(p, axis=-1), axis=-1))


@LOSSES.register("nt_xent")
def nt_xent(p, t, temperature=0.5):
    """SimCLR's NT-Xent in one direction: row i of p is an anchor, row i of t
    its positive, every other row of t and of p a negative, the cross-entropy
    of cos / `temperature`. The model's average over the two views is then
    NT-Xent over the 2N views (Chen et al. 2020).

    Under tf.distribute the negatives are the global batch's: p and t are
    gathered from every replica (differentiably: an all-reduce's gradient is
    an all-reduce) and this replica's anchors scored against all of them, so
    the mean over replicas is the loss of the global batch on one device.
    """
    p = ops.normalize(ops.cast(p, "float32"), axis=-1)
    t = ops.normalize(ops.cast(t, "float32"), axis=-1)
    all_p, all_t, start, size = p, t, 0, ops.shape(p)[0]
    context = distribute.replica_context()
    if context is not None:
        _, rows, start, size = distribute.gather_global_batch(
            context, tf.range(size), ops.concatenate([p, t], axis=1))
        all_p, all_t = ops.split(rows, 2, axis=1)
    total = ops.shape(all_t)[0]
    anchors = start + ops.arange(size)
    logits = ops.matmul(p, ops.transpose(ops.concatenate([all_t, all_p], axis=0))) / temperature
    # An anchor is not its own negative: its column among the p is masked out.
    itself = ops.one_hot(total + anchors, 2 * total) > 0
    logits = ops.where(itself, -1e9, logits)
    return ops.mean(ops.sparse_categorical_crossentropy(anchors, logits, from_logits=True))
