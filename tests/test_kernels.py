"""Tests of kernels/: the history exchange and the representation noise,
checked number by number against the numpy references in kernels/reference.py."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclic_tf.kernels import history_exchange, representation_noise
from simclic_tf.kernels.history import _exchange, _exchange_xla_math, _pick_exchange
from simclic_tf.kernels.reference import (
    history_exchange_reference,
    representation_noise_reference,
)
from kernel_helpers import (BF16_RTOL, DTYPES, MODES, assert_bank_close, bits, make_vars,
                            wrap_modes)

_WRAPPED = wrap_modes(history_exchange)


def exchange(mode, *args):
    old, seen = _WRAPPED[mode](*args)
    return old.numpy(), seen.numpy()


def random_case(rng, n=50, d=8, b=16):
    indices = rng.integers(0, n, size=b).astype(np.int32)
    indices[-3:] = indices[0]  # At least one index held by four positions.
    return indices, rng.normal(size=(b, d)).astype(np.float32)


# --------------------------------------------------------------------------
# history_exchange


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(mode, dtype, momentum, seed):
    rng = np.random.default_rng(seed)
    n, d = 50, 8
    bank_np = rng.normal(size=(n, d)).astype(np.float32).astype(DTYPES[dtype])
    visits_np = rng.integers(0, 3, size=n).astype(np.int32)  # Some rows unseen.
    bank, visits = make_vars(bank_np, visits_np)
    for _ in range(3):  # Several steps: rows go from unseen to seen.
        indices, values = random_case(rng, n, d)
        old, seen = exchange(mode, bank, visits, indices, values, momentum)
        ref_old, ref_seen, ref_bank, ref_visits = history_exchange_reference(
            bank_np, visits_np, indices, values, momentum
        )
        np.testing.assert_array_equal(old, ref_old)  # A gather: bit-exact.
        np.testing.assert_array_equal(seen, ref_seen)
        np.testing.assert_array_equal(visits.numpy(), ref_visits)
        got_bank = bank.numpy()
        assert got_bank.dtype == bank_np.dtype
        assert_bank_close(got_bank, ref_bank)
        untouched = np.setdiff1d(np.arange(n), indices)
        assert bits(got_bank[untouched]) == bits(bank_np[untouched])
        # Continue from the kernel's own state, so bf16 rounding never drifts.
        bank_np, visits_np = got_bank, visits.numpy()


@pytest.mark.parametrize("mode", MODES)
def test_duplicates_write_the_mean_once(mode):
    d = 4
    bank_np = np.arange(10 * d, dtype=np.float32).reshape(10, d)
    visits_np = np.zeros(10, np.int32)
    visits_np[4] = 2
    bank, visits = make_vars(bank_np, visits_np)
    indices = np.array([4, 9, 4, 4], np.int32)
    values = np.array(
        [[1, 2, 3, 4], [5, 5, 5, 5], [0.5, 0, 1, 2], [2, 1, 0.25, 0]], np.float32
    )
    old, seen = exchange(mode, bank, visits, indices, values, 0.5)
    # Every duplicate position returns the same pre-update row.
    for k in (0, 2, 3):
        np.testing.assert_array_equal(old[k], bank_np[4])
    np.testing.assert_array_equal(old[1], bank_np[9])
    np.testing.assert_array_equal(seen, [True, False, True, True])
    mean4 = values[[0, 2, 3]].mean(axis=0)
    np.testing.assert_allclose(bank.numpy()[4], 0.5 * bank_np[4] + 0.5 * mean4, rtol=1e-6)
    np.testing.assert_array_equal(bank.numpy()[9], values[1])  # First visit.
    np.testing.assert_array_equal(visits.numpy()[[4, 9]], [3, 1])  # Once each.

    # The order of the positions cannot matter (values sum exactly here).
    bank2, visits2 = make_vars(bank_np, visits_np)
    perm = [3, 1, 0, 2]
    exchange(mode, bank2, visits2, indices[perm], values[perm], 0.5)
    assert bits(bank2.numpy()) == bits(bank.numpy())
    np.testing.assert_array_equal(visits2.numpy(), visits.numpy())


@pytest.mark.parametrize("mode", MODES)
def test_first_visit_then_seen(mode):
    rng = np.random.default_rng(7)
    bank_np = rng.normal(size=(20, 6)).astype(np.float32)  # Garbage, never written.
    bank, visits = make_vars(bank_np, np.zeros(20, np.int32))
    indices = np.array([3, 11, 0], np.int32)
    v1 = rng.normal(size=(3, 6)).astype(np.float32)
    # First visit: the momentum is ignored, the row IS the value, bit for bit.
    old, seen = exchange(mode, bank, visits, indices, v1, 0.5)
    np.testing.assert_array_equal(seen, [False, False, False])
    np.testing.assert_array_equal(old, bank_np[indices])
    assert bits(bank.numpy()[indices]) == bits(v1)
    # Second visit: seen, the old rows are exactly the first values; m = 0
    # replaces bit-exactly.
    v2 = rng.normal(size=(3, 6)).astype(np.float32)
    old, seen = exchange(mode, bank, visits, indices, v2, 0.0)
    np.testing.assert_array_equal(seen, [True, True, True])
    assert bits(old) == bits(v1)
    assert bits(bank.numpy()[indices]) == bits(v2)
    np.testing.assert_array_equal(visits.numpy()[indices], [2, 2, 2])
    rest = np.setdiff1d(np.arange(20), indices)
    assert bits(bank.numpy()[rest]) == bits(bank_np[rest])
    assert not visits.numpy()[rest].any()


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_is_a_no_op(mode):
    rng = np.random.default_rng(3)
    bank_np = rng.normal(size=(8, 5)).astype(np.float32)
    visits_np = rng.integers(0, 3, size=8).astype(np.int32)
    bank, visits = make_vars(bank_np, visits_np)
    old, seen = exchange(
        mode, bank, visits, np.zeros([0], np.int32), np.zeros([0, 5], np.float32), 0.5
    )
    assert old.shape == (0, 5) and old.dtype == np.float32
    assert seen.shape == (0,) and seen.dtype == bool
    assert bits(bank.numpy()) == bits(bank_np)
    np.testing.assert_array_equal(visits.numpy(), visits_np)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
def test_keras_variables(mode, dtype):
    rng = np.random.default_rng(5)
    bank_np = rng.normal(size=(30, 4)).astype(np.float32).astype(DTYPES[dtype])
    visits_np = rng.integers(0, 2, size=30).astype(np.int32)
    bank = keras.Variable(bank_np, dtype=dtype, trainable=False)
    visits = keras.Variable(visits_np, dtype="int32", trainable=False)

    # As a Keras layer uses them: captured, not passed as tf.function
    # arguments (an argument would be converted to a tensor first).
    def step(indices, values):
        return history_exchange(bank, visits, indices, values, 0.5)

    if mode != "eager":
        step = tf.function(step, jit_compile=(mode == "jit"))
    indices, values = random_case(rng, 30, 4, 8)
    old, seen = step(indices, values)
    ref_old, ref_seen, ref_bank, ref_visits = history_exchange_reference(
        bank_np, visits_np, indices, values, 0.5
    )
    np.testing.assert_array_equal(old.numpy(), ref_old)
    np.testing.assert_array_equal(seen.numpy(), ref_seen)
    assert_bank_close(bank.numpy(), ref_bank)
    np.testing.assert_array_equal(visits.numpy(), ref_visits)


class MixedPrecisionExchange(keras.layers.Layer):
    """Runs the exchange inside a mixed_float16 layer's call, where Keras
    autocasts the float32 variables it reads: `.value` is a float16 copy."""

    def __init__(self, bank, visits):
        super().__init__(dtype="mixed_float16")
        self.bank, self.visits = bank, visits

    def call(self, unused):
        assert self.bank.value.dtype == tf.float16
        history_exchange(self.bank, self.visits, [1], np.full((1, 3), 0.1, np.float32))
        return unused


def test_keras_variable_under_autocast_and_stateless_scope():
    bank = keras.Variable(np.zeros((5, 3), np.float32))
    visits = keras.Variable(np.zeros(5, np.int32), dtype="int32", trainable=False)
    # Mixed precision: the bank is still updated in place, in float32.
    MixedPrecisionExchange(bank, visits)(np.zeros(1, np.float32))
    assert bank.dtype == "float32"
    np.testing.assert_array_equal(bank.numpy()[1], np.float32(0.1))
    with keras.StatelessScope():
        with pytest.raises(ValueError, match="StatelessScope"):
            history_exchange(bank, visits, [1], np.ones((1, 3), np.float32))


def test_int64_indices_and_tensor_momentum():
    bank, visits = make_vars(np.ones((6, 2), np.float32), np.ones(6, np.int32))
    history_exchange(bank, visits, tf.constant([2], tf.int64), [[3.0, 5.0]], tf.constant(0.25))
    np.testing.assert_allclose(bank.numpy()[2], [2.5, 4.0])


def test_held_read_is_not_clobbered():
    # A tensor read before the exchange keeps its value (XLA only donates
    # the variable's buffer when nothing else holds it).
    bank, visits = make_vars(np.zeros((6, 2), np.float32), np.zeros(6, np.int32))
    before = bank.value()
    history_exchange(bank, visits, [1], [[1.0, 1.0]])
    np.testing.assert_array_equal(before.numpy(), 0.0)
    np.testing.assert_array_equal(bank.numpy()[1], 1.0)


# ---- The update never touches the whole bank --------------------------------

N_BIG, D_BIG, B_BIG = 97, 6, 5  # N distinct from every other dimension.


def _graph_shapes_with_dim(graph, n):
    """(op type, shape) of every non-resource op output with a dimension n."""
    found = []
    for op in graph.get_operations():
        for out in op.outputs:
            if out.dtype == tf.resource or out.shape.rank is None:
                continue
            if n in out.shape.as_list():
                found.append((op.type, tuple(out.shape.as_list())))
    return found


def _hlo_ops_with_dim(hlo, n):
    """Opcodes of HLO instructions whose (array) result has a dimension n."""
    ops = set()
    pattern = re.compile(r"=\s*\w+\[([\d,]*)\]\{[^}]*\}\s+([\w-]+)\(")
    for line in hlo.splitlines():
        m = pattern.search(line)
        if m and str(n) in m.group(1).split(","):
            ops.add(m.group(2))
    return ops


# Opcodes that may produce an N-row array: the variable coming in, the in-place
# scatter (possibly inside a fusion), views and tuple plumbing. A `copy`, a
# `broadcast`, a `select` or any elementwise op over N rows would be O(N).
_ALLOWED_N_OPS = {"parameter", "scatter", "fusion", "bitcast", "tuple", "get-tuple-element"}


def _big_case(dtype=tf.float32):
    bank = tf.Variable(tf.zeros([N_BIG, D_BIG], dtype))
    visits = tf.Variable(tf.zeros([N_BIG], tf.int32))
    indices = tf.constant([3, 50, 3, 96, 0], tf.int32)
    values = tf.ones([B_BIG, D_BIG])
    return bank, visits, indices, values, tf.constant(0.5)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_traced_graph_never_materialises_the_bank(dtype):
    args = _big_case(dtype)
    outer = tf.function(history_exchange).get_concrete_function(*args)
    for exchange_fn in (_exchange, _exchange_xla_math):
        inner = exchange_fn.get_concrete_function(*args)
        for graph in (outer.graph, inner.graph):
            assert _graph_shapes_with_dim(graph, N_BIG) == []
        inner_types = {op.type for op in inner.graph.get_operations()}
        assert {"ResourceGather", "ResourceScatterUpdate"} <= inner_types
        assert "ReadVariableOp" not in inner_types


def test_xla_updates_a_float32_bank_in_place():
    hlo = _exchange.experimental_get_compiler_ir(*_big_case())(stage="optimized_hlo")
    header = hlo.splitlines()[0]
    assert "input_output_alias" in header  # Bank and visits buffers are reused.
    ops = _hlo_ops_with_dim(hlo, N_BIG)
    assert "scatter" in ops
    assert ops <= _ALLOWED_N_OPS, ops


def test_bfloat16_bank_on_cpu_avoids_xla_scatter():
    """XLA:CPU upcasts a bfloat16 scatter: whole-bank converts around it. So on
    CPU a bfloat16 bank takes the path whose gather and scatter are TF kernels
    (checked op by op in test_traced_graph_never_materialises_the_bank)."""
    args = _big_case(tf.bfloat16)
    hlo = _exchange.experimental_get_compiler_ir(*args)(stage="optimized_hlo")
    assert "convert" in _hlo_ops_with_dim(hlo, N_BIG)  # Why the other path exists.
    assert _pick_exchange(args[0]) is _exchange_xla_math
    assert _pick_exchange(_big_case(tf.float32)[0]) is _exchange


def test_banks_of_different_shapes_in_one_outer_function():
    @tf.function
    def step(bank, visits, indices, values):
        return history_exchange(bank, visits, indices, values, 0.0)

    for d in (4, 6, 4, 3):
        bank, visits = make_vars(np.zeros((9, d), np.float32), np.zeros(9, np.int32))
        values = np.full((2, d), d, np.float32)
        step(bank, visits, np.array([1, 8], np.int32), values)
        np.testing.assert_array_equal(bank.numpy()[[1, 8]], values)


def test_hlo_check_catches_a_full_copy():
    """The check above is not vacuous: a scatter whose rows do not depend on
    the gathered ones makes XLA copy the whole bank (twice)."""
    bank, _, indices, values, _ = _big_case()

    @tf.function(jit_compile=True)
    def naive(bank, indices, values):
        old = tf.gather(bank, indices)
        bank.scatter_update(tf.IndexedSlices(values, indices))
        return old

    hlo = naive.experimental_get_compiler_ir(bank, indices, values)(stage="optimized_hlo")
    assert "copy" in _hlo_ops_with_dim(hlo, N_BIG)


# --------------------------------------------------------------------------
# representation_noise


def _eps(shape, seed, jit=False):
    # The eps of the kernel: drawn in the caller's context, and XLA's
    # stateless normal draws different numbers from TF's for the same seed.
    draw = tf.function(tf.random.stateless_normal, jit_compile=True) if jit else \
        tf.random.stateless_normal
    return draw(shape, seed)


NOISE_MODES = {
    "eager": representation_noise,
    "function": tf.function(representation_noise),
    "jit": tf.function(representation_noise, jit_compile=True),
}


@pytest.mark.parametrize("mode", list(NOISE_MODES))
def test_noise_matches_reference(mode):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(16, 8)) * np.linspace(0.1, 3.0, 8)).astype(np.float32)
    seed = tf.constant([3, 4], tf.int32)
    out = NOISE_MODES[mode](tf.constant(x), 0.5, seed).numpy()
    eps = _eps(tf.constant([16, 8]), seed, jit=mode == "jit").numpy()
    np.testing.assert_allclose(
        out, representation_noise_reference(x, 0.5, eps), rtol=1e-5, atol=1e-5
    )


def test_noise_seeds():
    x = tf.random.stateless_normal([32, 8], [0, 0])
    a = representation_noise(x, 0.5, tf.constant([1, 2]))
    b = representation_noise(x, 0.5, tf.constant([1, 2]))
    c = representation_noise(x, 0.5, tf.constant([1, 3]))
    assert bits(a.numpy()) == bits(b.numpy())
    assert not np.allclose(a.numpy(), c.numpy())
    # An int64 seed (a Keras SeedGenerator's state) works and is folded to int32.
    gen = keras.random.SeedGenerator(42)
    s = gen.next()
    assert s.dtype == tf.int64
    d = representation_noise(x, 0.5, s)
    e = representation_noise(x, 0.5, tf.cast(tf.math.floormod(s, 2**31 - 2), tf.int32))
    assert bits(d.numpy()) == bits(e.numpy())


def test_noise_empirical_scale():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(8192, 4)) * [0.01, 1.0, 10.0, 300.0] + 5.0).astype(np.float32)
    scale = 0.7
    out = representation_noise(tf.constant(x), scale, tf.constant([9, 9])).numpy()
    z = (out - x) / x.std(axis=0, keepdims=True)  # Should be scale * N(0, 1).
    np.testing.assert_allclose(z.std(axis=0), scale, rtol=0.05)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=0.05)


@pytest.mark.parametrize("jit", [False, True])
def test_noise_gradient_is_identity(jit):
    x = tf.random.stateless_normal([16, 8], [5, 6])
    w = tf.random.stateless_normal([16, 8], [7, 8])

    def grads(x):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            out = representation_noise(x, 0.5, tf.constant([1, 1]))
            total = tf.reduce_sum(out)
            weighted = tf.reduce_sum(out * w)
        return tape.gradient(total, x), tape.gradient(weighted, x)

    if jit:
        grads = tf.function(grads, jit_compile=True)
    ones, gw = grads(x)
    assert bits(ones.numpy()) == bits(np.ones([16, 8], np.float32))
    assert bits(gw.numpy()) == bits(w.numpy())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_noise_low_precision_dtype(dtype):
    rng = np.random.default_rng(2)
    x32 = rng.normal(size=(16, 8)).astype(np.float32)
    x = tf.cast(tf.constant(x32), dtype)
    seed = tf.constant([4, 2])
    out = representation_noise(x, 0.5, seed)
    assert out.dtype == x.dtype and out.shape == x.shape
    x_np = x.numpy()
    ref = representation_noise_reference(x_np, 0.5, _eps(tf.constant([16, 8]), seed).numpy())
    assert ref.dtype == x_np.dtype
    rtol = BF16_RTOL if dtype == "bfloat16" else 2.0**-10
    np.testing.assert_allclose(
        out.numpy().astype(np.float32), ref.astype(np.float32), rtol=rtol, atol=rtol
    )
