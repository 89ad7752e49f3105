"""Helpers shared by the kernel tests (test_kernels.py, test_custom_op.py)."""

import ml_dtypes
import numpy as np
import tensorflow as tf

MODES = ["eager", "function", "jit"]
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
BF16_RTOL = 2.0**-7  # One bfloat16 ulp, relative.


def wrap_modes(fn):
    """`fn` eagerly, in a tf.function and in a jit-compiled tf.function. Made
    once per kernel and shared by all tests: tracing and XLA compiling once
    per signature keeps the suites fast."""
    return {"eager": fn, "function": tf.function(fn),
            "jit": tf.function(fn, jit_compile=True)}


def make_vars(bank, visits):
    return tf.Variable(bank), tf.Variable(np.asarray(visits, np.int32))


def bits(a):
    """The raw bytes of an array, for bit-exact comparisons (bf16 included)."""
    return np.ascontiguousarray(a).tobytes()


def assert_bank_close(got, ref):
    got32, ref32 = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    if ref.dtype == ml_dtypes.bfloat16:
        np.testing.assert_allclose(got32, ref32, rtol=BF16_RTOL, atol=1e-30)
    else:
        np.testing.assert_allclose(got32, ref32, rtol=1e-6, atol=1e-6)
