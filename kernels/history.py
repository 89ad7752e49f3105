"""The history-buffer exchange: read a batch of rows of `H`, then write them.

`history_exchange(bank, visits, indices, values, momentum)` returns, for each
batch position, the row `bank[indices[k]]` as it was *before* this call (float32)
and whether that row had ever been written (`visits > 0`), then updates the
rows in place:

* every distinct index `u` of the batch receives `v_u`, the MEAN of the values
  at the positions holding `u` (order-independent, so it stays well defined when
  replicas all-gather `(i, z)` before the scatter);
* a row never written before (`visits[u] == 0`) becomes `v_u` exactly; any
  other becomes `m * bank[u] + (1 - m) * v_u`, computed in float32 and cast to
  the bank's storage dtype (float32 or bfloat16);
* `visits[u] += 1`, once per call whatever the number of duplicates.

Cost: O(B x d) memory traffic on the bank plus O(B log B) for the duplicates;
nothing is O(N). The duplicates are averaged by sorting the B indices (static
shape, `tf.argsort`; `tf.unique` has a dynamic output shape and does not compile
under XLA), numbering the runs of equal indices 0..(#distinct - 1), and a
`unsorted_segment_sum` with `num_segments=B` (not N). Each position then
gathers the mean of its segment, so every duplicate position scatters the
bit-identical row and the (unspecified) order in which a scatter applies
duplicate indices cannot matter. A single (non-duplicated) position gets its
own value bit-exactly (0 + v, then v / 1).

How it is compiled
------------------
The whole exchange (ResourceGather of the B old rows and counts, the
arithmetic, ResourceScatterUpdate of the B new rows and counts) is one
`tf.function(jit_compile=True)`, `_exchange`, taking the variables as
arguments; `history_exchange` is a thin Python wrapper that resolves Keras
variables and normalises the arguments, then calls it. Eagerly, or from an
outer plain `tf.function` (what a Keras `train_step` runs in with
`jit_compile=False`), it is one XLA launch; inside an outer
`tf.function(jit_compile=True)` (Keras 3's "auto" default on TF) it is inlined
into the caller's cluster.

In place under XLA, and the one subtlety: XLA has no variables, so TF passes
the variable's buffer in and takes the updated one out, with the two aliased
(`input_output_alias ... may-alias` in the HLO) and the buffer donated at run
time when nothing else holds it. XLA then scatters in place *only if* it can
prove every read of the old buffer happens before the scatter. A scatter whose
updates do not depend on the gather (`old = gather(bank, i); scatter(bank, i,
v)`) makes XLA's copy insertion keep the old value alive with two full N x d
copies per call (measured on CPU, N = 2M, d = 128, B = 256: 120 ms against
0.3 ms). Here the new rows are computed from the gathered old rows (the
`tf.where(seen, m * old + (1 - m) * v, v)`, even for m = 0) and the new counts
from the old counts, so the gathers are ordered before the scatters by data
flow and no copy is made; `tests/test_kernels.py` checks the optimised HLO for
it. Keep that dependency if you edit `_new_rows`.

One exception: a bfloat16 (or float16) bank on CPU. XLA:CPU has no
low-precision scatter, and its float normalisation converts the whole bank to
float32 and back around the scatter (O(N x d)). For such a bank the wrapper
runs `_exchange_xla_math` instead: TF's own in-place ResourceGather and
ResourceScatterUpdate kernels around the XLA-compiled arithmetic. XLA:GPU lists
scatter among its bfloat16 "data movement" ops, so on GPU the default path
should stay in place for bfloat16 too (read from XLA's source, not yet checked
on a GPU). An enclosing jit-compiled function on CPU compiles everything into
its own cluster, so the float normalisation comes back there (a Keras
`train_step` is jit-compiled by default): nothing this module can do about it;
the C++ op (`kernels.custom_op`) avoids it with an in-place XLA custom call.

Variables: `bank` and `visits` may be `tf.Variable`s or Keras 3 `keras.Variable`s
(TF backend); for the latter the underlying `tf.Variable` (`_value`) is used
directly, bypassing Keras autocasting (under a mixed-precision policy
`keras.Variable.value` may return a cast copy, not the variable). Calling inside
a Keras `StatelessScope` raises: an in-place update has no stateless meaning.

Indices must lie in [0, N). Eagerly and in a plain `tf.function` an index
outside is an `InvalidArgumentError` naming the position, the index and N,
raised before anything is written (`check_indices`, run before the compiled
exchange). Under an enclosing `jit_compile=True` no op can raise at run time
(XLA ignores `Assert`), so the compiled exchange itself guards them: such a
position writes nothing (its scatter index is moved to N, which XLA's scatter
skips) and returns a NaN row with `seen = True`, so that the target and the
loss turn NaN instead of training silently on a clamped row. The C++ op
(`kernels/custom_op.py`) behaves the same way.

Design notes
------------
* The C++ custom op (`kernels/custom_op.py`: gather, average duplicates, mix,
  scatter in one kernel) has this same Python signature and writes the same
  bits; `kernels.select(kernel_impl)` picks between the two.
* A bank sharded across R replicas (`simclic_tf.history_bank.ShardedBank`)
  reuses this function unchanged on each shard with local indices: after the
  all-gather of `(i, z)` replica r maps the positions it owns (`i % R == r`)
  to `i // R` and every other one to a scratch row, calls `history_exchange`
  on its shard, and the old rows of the owned positions are summed across
  replicas. Because duplicates write their mean, the result does not depend
  on the gather order.
"""

import keras
import tensorflow as tf

from simclic_tf import compat

__all__ = ["history_exchange", "check_indices", "prepare_arguments"]


def _as_tf_variable(var, name):
    """The `tf.Variable` behind `var` (a tf.Variable or a Keras 3 Variable)."""
    if isinstance(var, tf.Variable):
        return var
    if isinstance(var, keras.Variable):
        if compat.in_stateless_scope():
            raise ValueError(
                f"history_exchange: `{name}` ({var.path}) is updated in place, "
                "which is impossible inside a Keras StatelessScope."
            )
        inner = compat.tf_variable(var)
        if isinstance(inner, tf.Variable):
            return inner
    raise TypeError(
        f"history_exchange: `{name}` must be a tf.Variable or a keras.Variable "
        f"backed by one (TensorFlow backend); got {type(var).__name__}."
    )


def _segment_mean(indices, values):
    """Per position, the mean of `values` over the positions with its index.

    Static shapes only (O(B log B), independent of N): sort the indices,
    number the runs of equal indices, segment-sum with `num_segments=B`, and
    gather each position's segment back, so positions holding the same index
    get bit-identical results and a lone position gets its value exactly.
    """
    batch = tf.shape(indices)[0]
    order = tf.argsort(indices, stable=True)
    sorted_indices = tf.gather(indices, order)
    starts_run = tf.concat(
        [tf.ones([1], tf.int32)[:batch],  # Empty when B = 0.
         tf.cast(sorted_indices[1:] != sorted_indices[:-1], tf.int32)],
        axis=0,
    )
    seg_sorted = tf.cumsum(starts_run) - 1  # Run number, in sorted order.
    seg = tf.scatter_nd(order[:, None], seg_sorted, [batch])  # Back to positions.
    sums = tf.math.unsorted_segment_sum(values, seg, num_segments=batch)
    counts = tf.math.unsorted_segment_sum(
        tf.ones([batch], values.dtype), seg, num_segments=batch
    )
    return tf.gather(sums, seg) / tf.gather(counts, seg)[:, None]


def _new_rows(old_rows, old_visits, indices, values, momentum, num_rows):
    """The arithmetic: (old rows as float32, seen, new rows, new counts, the
    scatter indices).

    The new rows and counts are computed FROM the gathered old ones; this data
    dependency is what lets XLA scatter in place (module docstring).
    Out-of-range positions (only reachable under an enclosing jit, where
    `check_indices` cannot raise) get a NaN row, `seen = True` and the
    scatter index N, which XLA's scatter skips.
    """
    old32 = tf.cast(old_rows, tf.float32)
    valid = (indices >= 0) & (indices < num_rows)
    seen = old_visits > 0
    mean = _segment_mean(indices, values)
    new32 = tf.where(seen[:, None], momentum * old32 + (1.0 - momentum) * mean, mean)
    old32 = tf.where(valid[:, None], old32, tf.constant(float("nan"), tf.float32))
    targets = tf.where(valid, indices, num_rows)
    return (old32, seen | ~valid, tf.cast(new32, old_rows.dtype), old_visits + 1,
            targets)


def _exchange_ops(bank, visits, indices, values, momentum, new_rows_fn):
    old_rows = tf.gather(bank, indices)  # ResourceGather: B rows, storage dtype.
    old_visits = tf.gather(visits, indices)
    old32, seen, new_rows, new_visits, targets = new_rows_fn(
        old_rows, old_visits, indices, values, momentum, bank.shape[0]
    )
    # In-place scatters; duplicate positions carry identical rows and counts,
    # so the order in which the scatter applies them cannot matter.
    bank.scatter_update(tf.IndexedSlices(new_rows, targets))
    visits.scatter_update(tf.IndexedSlices(new_visits, targets))
    return old32, seen


# No reduce_retracing here: with it, TF 2.21 reused a trace made for a bank of
# another shape when the variables came from an enclosing tf.function.
@tf.function(jit_compile=True, autograph=False)
def _exchange(bank, visits, indices, values, momentum):
    """The whole exchange as one XLA computation (the default path)."""
    return _exchange_ops(bank, visits, indices, values, momentum, _new_rows)


_new_rows_xla = tf.function(
    _new_rows, jit_compile=True, autograph=False, reduce_retracing=True
)
# (num_rows is a Python int: one trace per bank size, like the variables.)


@tf.function(autograph=False)
def _exchange_xla_math(bank, visits, indices, values, momentum):
    """Gather and scatter as TF kernels around the XLA-compiled arithmetic.

    Used for bfloat16 / float16 banks on CPU: XLA:CPU has no low-precision
    scatter, so its float normalisation would convert the WHOLE bank to float32
    and back around the scatter (O(N x d)); TF's CPU ResourceScatterUpdate
    kernel writes the B bfloat16 rows in place. (XLA:GPU scatters bfloat16
    natively: `GpuFloatSupport` lists scatter as data movement.)
    """
    return _exchange_ops(bank, visits, indices, values, momentum, _new_rows_xla)


def _pick_exchange(bank):
    """The compiled exchange to run for this bank (see `_exchange_xla_math`)."""
    if bank.dtype in (tf.bfloat16, tf.float16):
        device_type = tf.DeviceSpec.from_string(bank.device or "").device_type
        if device_type == "CPU":
            return _exchange_xla_math
    return _exchange


def in_xla_context():
    """Whether ops built now will be compiled by an enclosing XLA function."""
    return not tf.executing_eagerly() and compat.in_xla_context()


def check_indices(indices, num_rows, name="history_exchange"):
    """An InvalidArgumentError naming the first index outside [0, num_rows).

    Eagerly it raises here; in a graph it returns an Assert op to run before
    the exchange; under an enclosing XLA compilation it returns None (XLA
    cannot raise: the exchange guards out-of-range positions itself).
    """
    if tf.executing_eagerly():
        values = indices.numpy()
        bad = ((values < 0) | (values >= num_rows)).nonzero()[0]
        if len(bad):
            k = int(bad[0])
            raise tf.errors.InvalidArgumentError(
                None, None,
                f"{name}: indices[{k}] = {int(values[k])} is not in [0, {num_rows}): "
                f"the history bank has N = {num_rows} rows")
        return None
    if in_xla_context():
        return None
    batch = tf.size(indices, out_type=tf.int64)
    bad = tf.where((indices < 0) | (indices >= num_rows))[:, 0]
    first = tf.reduce_min(tf.concat([bad, batch[None]], 0))  # B when none is bad.
    message = tf.strings.format(
        name + ": indices[{}] = {} is not in [0, " + str(num_rows)
        + "): the history bank has N = " + str(num_rows) + " rows",
        (first, tf.gather(tf.concat([indices, [-1]], 0), first)))
    return tf.debugging.Assert(tf.size(bad) == 0, [message], name="check_indices")


def prepare_arguments(bank, visits, indices, values, momentum, name="history_exchange"):
    """Resolve the variables and normalise the arguments (both implementations)."""
    bank = _as_tf_variable(bank, "bank")
    visits = _as_tf_variable(visits, "visits")
    if bank.shape.rank != 2 or not bank.dtype.is_floating:
        raise ValueError(
            f"{name}: bank must be a float (N, d) variable; got "
            f"{bank.dtype.name} {bank.shape}"
        )
    if visits.dtype != tf.int32 or visits.shape.rank != 1:
        raise ValueError(
            f"{name}: visits must be an int32 (N,) variable; got "
            f"{visits.dtype.name} {visits.shape}"
        )
    indices = tf.cast(tf.convert_to_tensor(indices), tf.int32)
    values = tf.cast(tf.stop_gradient(tf.convert_to_tensor(values)), tf.float32)
    momentum = tf.cast(tf.convert_to_tensor(momentum), tf.float32)
    indices.shape.assert_has_rank(1)
    values.shape.assert_is_compatible_with(
        tf.TensorShape([indices.shape[0], bank.shape[1]])
    )
    momentum.shape.assert_has_rank(0)
    return bank, visits, indices, values, momentum


def history_exchange(bank, visits, indices, values, momentum=0.0):
    """Return the rows `bank[indices]` before updating them with `values`.

    Args:
      bank: tf.Variable or keras.Variable (N, d), float32 or bfloat16 storage.
      visits: tf.Variable or keras.Variable (N,) int32, writes per row.
      indices: int (B,) row indices in [0, N) (int64 is cast to int32).
      values: float (B, d) new representations (gradient is stopped here).
      momentum: python float or scalar tensor m in [0, 1); 0 = replace.

    Returns:
      old_rows: float32 (B, d), the rows before this call's update (every
        duplicate position gets the same pre-update row).
      seen: bool (B,), whether each row had been written before this call.

    Raises:
      tf.errors.InvalidArgumentError: an index outside [0, N), before any
        write (eagerly, or when the graph runs); under an enclosing XLA
        compilation that position returns NaN and `seen = True` instead and
        writes nothing (module docstring).

    Works eagerly, inside `tf.function` and inside
    `tf.function(jit_compile=True)`; the work is one XLA-compiled function
    that updates the variables in place (for a low-precision bank on CPU, the
    arithmetic is XLA-compiled and the gather and scatter are TF's kernels).
    """
    bank, visits, indices, values, momentum = prepare_arguments(
        bank, visits, indices, values, momentum)
    check = check_indices(indices, bank.shape[0])
    with tf.control_dependencies([check] if check is not None else []):
        return _pick_exchange(bank)(bank, visits, indices, values, momentum)
