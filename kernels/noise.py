"""Representation noise: `x + scale * std_batch(x) * eps`, scale-free.

`std_batch(x)` is the per-dimension population standard deviation over the
batch axis (axis 0, kept as a size-1 axis), treated as a constant: the noise is
noise, so the gradient of the output with respect to `x` is the identity.
`eps ~ N(0, I)` comes from `tf.random.stateless_normal` with a shape-(2,)
integer seed (counter-based, so a `keras.random.SeedGenerator` can drive it:
pass `seed_generator.next()`). An int64 seed (what Keras' TF backend stores)
is folded to int32 exactly as `keras.random.normal` folds it.

`eps` is drawn in the caller's context and only the scaling is XLA-compiled:
XLA:CPU's random-bit generator is slow (measured: 48 ms for a 128 x 2048
draw against 2 ms for TF's kernel, a third of a ResNet-18 width-16 step), so
an always-compiled draw would make noise the costliest perturbation on CPU.
Under an enclosing `jit_compile=True` step the draw is compiled with it. TF
quirk: for the same seed XLA's stateless normal and TF's kernel draw
DIFFERENT numbers, so `eps` is reproducible per seed within one mode (eager
and `tf.function` agree; jit differs). The C++ op (`kernels.custom_op`) draws
the eager stream in every mode, under jit with its own Philox lowering. The arithmetic is float32 whatever
`x`'s dtype; the result has `x`'s dtype.
"""

import tensorflow as tf

__all__ = ["representation_noise", "seed_to_int32"]


def seed_to_int32(seed):
    """A shape-(2,) int32 seed; int64 is folded as Keras' TF backend does."""
    seed = tf.convert_to_tensor(seed)
    if seed.dtype == tf.int32:
        return seed
    if seed.dtype not in (tf.int64, tf.uint32, tf.uint64, tf.int16, tf.int8):
        raise ValueError(f"representation_noise: seed dtype {seed.dtype.name} is not an integer")
    seed = tf.cast(seed, tf.int64)
    return tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)


@tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
def _add_scaled_noise(x, scale, eps):
    x32 = tf.cast(x, tf.float32)
    std = tf.stop_gradient(tf.math.reduce_std(x32, axis=0, keepdims=True))
    return tf.cast(x32 + scale * std * eps, x.dtype)


def representation_noise(x, scale, seed):
    """`x + scale * std_batch(x) * eps`, `eps = stateless_normal(x.shape, seed)`.

    Args:
      x: float (B, d) (any rank >= 1: statistics over axis 0).
      scale: python float or scalar tensor s.
      seed: int32 or int64 tensor of shape (2,).

    Returns:
      A tensor like `x` (same shape and dtype). d(out)/dx is the identity.
    """
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        raise ValueError(f"representation_noise: x must be float; got {x.dtype.name}")
    x.shape.with_rank_at_least(1)
    scale = tf.cast(tf.convert_to_tensor(scale), tf.float32)
    scale.shape.assert_has_rank(0)
    seed = seed_to_int32(seed)
    seed.shape.assert_is_compatible_with([2])
    eps = tf.random.stateless_normal(tf.shape(x), seed=seed, dtype=tf.float32)
    return _add_scaled_noise(x, scale, eps)
