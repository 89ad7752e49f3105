"""The C++ custom-op implementation of the kernels (`kernels/cc/simclic_ops.cc`),
behind the same Python signatures as the TensorFlow functions in
`kernels.history` and `kernels.noise`.

Each op has a CPU kernel (what runs eagerly and in a plain `tf.function` on
CPU) and an XLA lowering (what runs inside `tf.function(jit_compile=True)`,
and on a GPU, where there is no native kernel: there the wrappers call the op
through a jit-compiled function). `kernels.build` compiles the library on
first use; `kernels.select("custom_op")` returns these functions.

Specification (shared with the TensorFlow implementation; tests/test_custom_op.py)
---------------------------------------------------------------------------------
`history_exchange(bank, visits, indices, values, momentum)`:

* `old_rows[k] = float32(bank[indices[k]])` before the call, `seen[k] =
  visits[indices[k]] > 0`: bit-identical in both implementations.
* Duplicates write their MEAN: for each distinct index u the values at the
  positions holding u are summed in ascending position order starting from
  0.0 (float32), then divided by their count (float32). Rows never seen get
  that mean exactly; seen rows get `fma(m, old, (1 - m) * mean)` in float32
  (one rounding for `m * old + ...`: what XLA:CPU computes for the TF
  implementation's `m * old + (1 - m) * mean`), rounded to nearest-even into
  the bank's dtype (float32 or bfloat16). `visits[u] += 1` once per call.
  On CPU, both implementations write bit-identical banks in every mode
  (eager, tf.function, jit); on GPU the duplicate sum of XLA's scatter-add
  may be applied in another order (3 or more duplicates: last-bit differences).
* Out of range: an index outside [0, N) is an `InvalidArgumentError` naming
  the position, the index and N, raised before any write (the CPU kernel
  checks; the TF implementation checks before its compiled exchange). Inside
  an enclosing XLA compilation no op can raise at run time: both then skip
  the write of that position and return a NaN row with `seen = True`.
* B = 0 is a no-op. No gradient flows into the bank, the visits or `values`.
* Cost O(B x d) in every mode: the CPU kernel updates the variables' buffers
  in place (copying them first only if a tensor read earlier still holds
  them); the XLA lowering's new rows depend on the gathered old ones, so XLA
  scatters in place, and a bfloat16 bank on XLA:CPU (which has no bfloat16
  scatter and would convert the whole bank to float32 and back) is written by
  an XLA FFI custom call whose output aliases the bank.

`representation_noise(x, scale, seed)` = `x + scale * std_batch(x) * eps`,
computed in float32, returned in x's dtype; d(out)/dx is the identity.

* `eps` is TensorFlow's stateless normal stream for the int32 seed (what
  `tf.random.stateless_normal(x.shape, seed)` draws on CPU: Philox-4x32-10
  keyed as StatelessRandomNormal's CPU kernel, Box-Muller): bit for bit in
  the CPU kernel, so eagerly and in a `tf.function` the custom op draws the
  same `eps` as the TF implementation. Its XLA lowering computes the same
  Philox bits and the same Box-Muller with XLA's own log/sin/cos, so under jit
  `eps` differs from the eager one by float32 rounding only (a few ulp), where
  the TF implementation under jit draws XLA's own, different stream. The draw
  is deterministic given (seed, shape) in every mode.
* `std_batch` is a float32 reduction whose summation order is backend-specific
  (XLA:CPU regroups the sum for larger batches), so the outputs of the two
  implementations agree to float32 rounding (relative 1e-6), not bitwise.
"""

import tensorflow as tf

from simclic_tf.kernels import build
from simclic_tf.kernels.history import check_indices, in_xla_context, prepare_arguments
from simclic_tf.kernels.noise import seed_to_int32

__all__ = ["history_exchange", "representation_noise", "ops"]

_gradients_registered = False


def ops():
    """The loaded op module; compiles the library on first use (BuildError)."""
    global _gradients_registered
    module = build.load()
    if not _gradients_registered:
        _register_gradients()
        _gradients_registered = True
    return module


def _register_gradients():
    try:
        tf.no_gradient("SimclicHistoryExchange")
    except KeyError:  # Registered already (the module was reloaded).
        pass
    try:
        @tf.RegisterGradient("SimclicRepresentationNoise")
        def _noise_gradient(op, grad):  # The noise is noise: identity in x.
            return [grad, None, None]
    except KeyError:
        pass


def _on_cpu(tensor_or_variable):
    device = getattr(tensor_or_variable, "device", "") or ""
    return tf.DeviceSpec.from_string(device).device_type in (None, "CPU")


def _exchange_op(bank, visits, indices, values, momentum):
    return ops().simclic_history_exchange(
        bank.handle, visits.handle, indices, values, momentum, dtype=bank.dtype)


# On a GPU the op has no native kernel: run its XLA lowering. (Variables are
# arguments, as in kernels.history._exchange.)
_exchange_jit = tf.function(_exchange_op, jit_compile=True, autograph=False)


def history_exchange(bank, visits, indices, values, momentum=0.0):
    """`kernels.history.history_exchange` as one C++ op (same arguments,
    results and errors; module docstring)."""
    module = ops()  # Build before tracing anything.
    del module
    bank, visits, indices, values, momentum = prepare_arguments(
        bank, visits, indices, values, momentum)
    if bank.dtype not in (tf.float32, tf.bfloat16):
        raise ValueError(f"history_exchange (custom op): bank dtype {bank.dtype.name} is "
                         "not supported; use float32 or bfloat16")
    if in_xla_context() or _on_cpu(bank):
        # The CPU kernel checks the indices itself, before writing.
        return tuple(_exchange_op(bank, visits, indices, values, momentum))
    check = check_indices(indices, bank.shape[0])
    with tf.control_dependencies([check] if check is not None else []):
        return tuple(_exchange_jit(bank, visits, indices, values, momentum))


def _noise_op(x, scale, seed):
    return ops().simclic_representation_noise(x, scale, seed)


_noise_jit = tf.function(_noise_op, jit_compile=True, autograph=False, reduce_retracing=True)


def representation_noise(x, scale, seed):
    """`kernels.noise.representation_noise` as one C++ op (module docstring)."""
    ops()
    x = tf.convert_to_tensor(x)
    if x.dtype not in (tf.float32, tf.bfloat16, tf.float16):
        raise ValueError(f"representation_noise (custom op): x must be float32, bfloat16 "
                         f"or float16; got {x.dtype.name}")
    x.shape.with_rank_at_least(1)
    scale = tf.cast(tf.convert_to_tensor(scale), tf.float32)
    scale.shape.assert_has_rank(0)
    seed = seed_to_int32(seed)
    seed.shape.assert_is_compatible_with([2])
    if in_xla_context() or _on_cpu(x):
        return _noise_op(x, scale, seed)
    return _noise_jit(x, scale, seed)
