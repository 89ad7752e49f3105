"""The distance D(p, t) between a prediction and its target, averaged over
the batch. Neither function stops gradients: the model decides that."""

from keras import ops

from simclic_tf.registry import LOSSES


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
