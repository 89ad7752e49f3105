"""Tests of the two kernel implementations (`kernels.select`): the C++ custom
ops (kernels/custom_op.py, compiled on first use into the cache folder) and the
TensorFlow functions, each against the numpy references and against each
other, eagerly, in tf.function and in tf.function(jit_compile=True); the
build's fallback and errors; loading the op library before and after the
process's first XLA compilation."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging
import re
import subprocess
import sys
import textwrap

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

from simclic_tf import kernels
from simclic_tf.kernels import build, custom_op
from simclic_tf.kernels.reference import history_exchange_reference, representation_noise_reference
from kernel_helpers import (DTYPES, MODES, assert_bank_close, bits, make_vars,
                            wrap_modes)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ["tf", "custom_op"]
_EXCHANGE = {impl: wrap_modes(kernels.select(impl).history_exchange) for impl in IMPLS}
_NOISE = {impl: wrap_modes(kernels.select(impl).representation_noise) for impl in IMPLS}


def exchange(impl, mode, *args):
    old, seen = _EXCHANGE[impl][mode](*args)
    return old.numpy(), seen.numpy()




def test_select():
    assert kernels.select("tf").name == "tf"
    assert kernels.select("custom_op").name == "custom_op"
    assert kernels.select("auto").name == "custom_op"  # It builds here.
    with pytest.raises(ValueError, match="kernel_impl 'cuda' is not accepted"):
        kernels.select("cuda")


# --------------------------------------------------------------------------
# history_exchange: both implementations, every mode


@pytest.mark.parametrize("momentum", [0.0, 0.3])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_exchange_matches_reference(impl, mode, dtype, momentum):
    rng = np.random.default_rng(1)
    n, d, b = 40, 8, 16
    bank_np = rng.normal(size=(n, d)).astype(np.float32).astype(DTYPES[dtype])
    visits_np = rng.integers(0, 3, size=n).astype(np.int32)
    bank, visits = make_vars(bank_np, visits_np)
    for _ in range(3):
        indices = rng.integers(0, n, size=b).astype(np.int32)
        indices[-4:] = indices[0]  # One index held by five positions.
        values = rng.normal(size=(b, d)).astype(np.float32)
        old, seen = exchange(impl, mode, bank, visits, indices, values, momentum)
        ref_old, ref_seen, ref_bank, ref_visits = history_exchange_reference(
            bank_np, visits_np, indices, values, momentum)
        assert bits(old) == bits(ref_old)
        np.testing.assert_array_equal(seen, ref_seen)
        np.testing.assert_array_equal(visits.numpy(), ref_visits)
        got = bank.numpy()
        assert got.dtype == bank_np.dtype
        assert_bank_close(got, ref_bank)
        untouched = np.setdiff1d(np.arange(n), indices)
        assert bits(got[untouched]) == bits(bank_np[untouched])
        bank_np, visits_np = got, visits.numpy()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_implementations_write_the_same_bits(dtype):
    """The specification's bit-exact part: old rows, seen, visits and the new
    bank rows (duplicate means included) agree bit for bit between the two
    implementations in every mode, for momentum 0 and in (0, 1)."""
    rng = np.random.default_rng(2)
    n, d, b = 60, 16, 32
    bank0 = rng.normal(size=(n, d)).astype(np.float32).astype(DTYPES[dtype])
    visits0 = rng.integers(0, 2, size=n).astype(np.int32)
    steps = []
    for momentum in (0.0, 0.3, 0.9):
        indices = rng.integers(0, n, size=b).astype(np.int32)
        indices[-6:] = indices[:6]  # Pairs, and runs of three below.
        indices[10:13] = indices[20]
        steps.append((indices, rng.normal(size=(b, d)).astype(np.float32), momentum))
    results = {}
    for impl in IMPLS:
        for mode in MODES:
            bank, visits = make_vars(bank0, visits0)
            outputs = [bits(np.concatenate([o, s[:, None]], 1))
                       for o, s in (exchange(impl, mode, bank, visits, *step) for step in steps)]
            results[impl, mode] = (bits(bank.numpy()), bits(visits.numpy()), outputs)
    first = results["tf", "eager"]
    for key, result in results.items():
        assert result == first, key


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_duplicates_and_first_visit(impl, mode):
    d = 4
    bank_np = np.arange(10 * d, dtype=np.float32).reshape(10, d)
    visits_np = np.zeros(10, np.int32)
    visits_np[4] = 2
    bank, visits = make_vars(bank_np, visits_np)
    indices = np.array([4, 9, 4, 4], np.int32)
    values = np.array([[1, 2, 3, 4], [5, 5, 5, 5], [0.5, 0, 1, 2], [2, 1, 0.25, 0]], np.float32)
    old, seen = exchange(impl, mode, bank, visits, indices, values, 0.5)
    for k in (0, 2, 3):
        assert bits(old[k]) == bits(bank_np[4])
    np.testing.assert_array_equal(seen, [True, False, True, True])
    mean4 = values[[0, 2, 3]].mean(axis=0)
    assert bits(bank.numpy()[4]) == bits(0.5 * bank_np[4] + 0.5 * mean4)  # Exact here.
    assert bits(bank.numpy()[9]) == bits(values[1])  # First visit: the value itself.
    np.testing.assert_array_equal(visits.numpy()[[4, 9]], [3, 1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl, mode):
    rng = np.random.default_rng(3)
    bank_np = rng.normal(size=(8, 5)).astype(np.float32)
    visits_np = rng.integers(0, 3, size=8).astype(np.int32)
    bank, visits = make_vars(bank_np, visits_np)
    old, seen = exchange(impl, mode, bank, visits, np.zeros([0], np.int32),
                         np.zeros([0, 5], np.float32), 0.5)
    assert old.shape == (0, 5) and old.dtype == np.float32
    assert seen.shape == (0,) and seen.dtype == bool
    assert bits(bank.numpy()) == bits(bank_np)
    np.testing.assert_array_equal(visits.numpy(), visits_np)


@pytest.mark.parametrize("bad", [50, -1])
@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_is_an_error_before_any_write(impl, mode, bad):
    bank_np = np.zeros((50, 4), np.float32)
    bank, visits = make_vars(bank_np, np.zeros(50, np.int32))
    indices = np.array([3, bad, 5], np.int32)
    message = re.escape(f"indices[1] = {bad} is not in [0, 50)") + ".*N = 50"
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        exchange(impl, mode, bank, visits, indices, np.ones((3, 4), np.float32), 0.0)
    assert bits(bank.numpy()) == bits(bank_np)
    assert not visits.numpy().any()


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_under_jit_writes_nothing_and_returns_nan(impl):
    """XLA cannot raise at run time: the position is skipped and poisoned."""
    bank_np = np.arange(200, dtype=np.float32).reshape(50, 4)
    bank, visits = make_vars(bank_np, np.ones(50, np.int32))
    indices = np.array([3, 77, 5, -2], np.int32)
    old, seen = exchange(impl, "jit", bank, visits, indices, np.ones((4, 4), np.float32), 0.0)
    assert np.isnan(old[[1, 3]]).all() and bits(old[[0, 2]]) == bits(bank_np[[3, 5]])
    np.testing.assert_array_equal(seen, [True, True, True, True])
    expected = bank_np.copy()
    expected[[3, 5]] = 1.0
    assert bits(bank.numpy()) == bits(expected)
    np.testing.assert_array_equal(np.flatnonzero(visits.numpy() == 2), [3, 5])


@pytest.mark.parametrize("mode", MODES)
def test_custom_op_keras_variables_and_held_reads(mode):
    rng = np.random.default_rng(5)
    bank_np = rng.normal(size=(30, 4)).astype(ml_dtypes.bfloat16)
    bank = keras.Variable(bank_np, dtype="bfloat16", trainable=False)
    visits = keras.Variable(np.zeros(30, np.int32), dtype="int32", trainable=False)
    held = tf.convert_to_tensor(bank)  # Read before the in-place update: kept.

    def step(indices, values):
        return custom_op.history_exchange(bank, visits, indices, values, 0.5)

    if mode != "eager":
        step = tf.function(step, jit_compile=(mode == "jit"))
    indices = np.array([1, 7, 1], np.int32)
    values = rng.normal(size=(3, 4)).astype(np.float32)
    step(indices, values)
    ref = history_exchange_reference(bank_np, np.zeros(30, np.int32), indices, values, 0.5)
    assert_bank_close(bank.numpy(), ref[2])
    assert bits(held.numpy()) == bits(bank_np)


def test_custom_op_has_no_gradient():
    bank, visits = make_vars(np.ones((6, 2), np.float32), np.ones(6, np.int32))
    values = tf.constant([[1.0, 2.0]])
    with tf.GradientTape() as tape:
        tape.watch(values)
        # The raw op, without the wrapper's stop_gradient: registered as
        # having no gradient (not an error, and nothing flows).
        old, _ = custom_op.ops().simclic_history_exchange(
            bank.handle, visits.handle, [2], values, 0.5, dtype=tf.float32)
    assert tape.gradient(tf.reduce_sum(old), values) is None


def _entry_ops_with_dim(hlo, n):
    """(opcode, name) of the ENTRY computation's instructions with a dimension
    n: what is materialised at that size (fused producers are computed on
    demand inside their fusion, so only the fusion's own output counts)."""
    ops = set()
    pattern = re.compile(r"%([\w.-]+) = \w+\[([\d,]*)\]\{[^}]*\}\s+([\w-]+)\(")
    for line in hlo[hlo.index("\nENTRY"):].splitlines():
        m = pattern.search(line)
        if m and str(n) in m.group(2).split(","):
            ops.add((m.group(3), m.group(1)))
    return ops


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_custom_op_xla_lowering_updates_the_bank_in_place(dtype):
    n = 97
    bank = tf.Variable(tf.zeros([n, 6], dtype))
    visits = tf.Variable(tf.zeros([n], tf.int32))
    args = (bank, visits, tf.constant([3, 50, 3, 96, 0]), tf.ones([5, 6]), tf.constant(0.5))
    fn = tf.function(custom_op.history_exchange, jit_compile=True)
    hlo = fn.experimental_get_compiler_ir(*args)(stage="optimized_hlo")
    assert "input_output_alias" in hlo.splitlines()[0]  # Bank and visits reused.
    ops = _entry_ops_with_dim(hlo, n)
    # Only the parameters and the in-place updates: a scatter (fused or not)
    # or, for a bfloat16 bank on CPU, the custom call that aliases the bank.
    for opcode, name in ops:
        assert opcode in {"parameter", "scatter", "custom-call", "bitcast"} or (
            opcode == "fusion" and "scatter" in name), ops
    if dtype == tf.bfloat16:  # No bfloat16 scatter on XLA:CPU: the custom call.
        assert any(op == "custom-call" for op, _ in ops)
        assert "output_to_operand_aliasing={{}: (0, {})}" in hlo
    fn(*args)
    np.testing.assert_array_equal(bank.numpy()[[3, 50, 96, 0]].astype(np.float32), 1.0)
    assert not bank.numpy()[[1, 2, 4]].astype(np.float32).any()


# --------------------------------------------------------------------------
# representation_noise


def _signs(rows, cols):
    """x with per-column mean 0 and std exactly 1: x + 1 * std * eps == x + eps."""
    return np.tile(np.array([[1.0], [-1.0]], np.float32), (rows // 2, cols))


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("impl", IMPLS)
def test_noise_draws_tensorflows_stateless_normal_bit_for_bit(impl, mode):
    x = _signs(64, 24)
    for seed in ([3, 4], [-7, 2**31 - 1]):
        out = _NOISE[impl][mode](tf.constant(x), 1.0, tf.constant(seed, tf.int32)).numpy()
        eps = tf.random.stateless_normal(x.shape, seed).numpy()
        assert bits(out) == bits(x + eps)


def test_custom_op_noise_under_jit_draws_the_same_eps_to_rounding():
    x = _signs(128, 64)
    seed = tf.constant([11, 12])
    eager = _NOISE["custom_op"]["eager"](tf.constant(x), 1.0, seed).numpy()
    jit = _NOISE["custom_op"]["jit"](tf.constant(x), 1.0, seed).numpy()
    np.testing.assert_allclose(jit, eager, rtol=1e-5, atol=1e-5)
    assert bits(jit) == bits(_NOISE["custom_op"]["jit"](tf.constant(x), 1.0, seed).numpy())


@pytest.mark.parametrize("mode", MODES)
def test_custom_op_noise_matches_reference(mode):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(100, 8)) * np.linspace(0.1, 3.0, 8) + 2).astype(np.float32)
    seed = tf.constant([3, 4])
    out = _NOISE["custom_op"][mode](tf.constant(x), 0.5, seed).numpy()
    eps = tf.random.stateless_normal(x.shape, seed).numpy()
    np.testing.assert_allclose(out, representation_noise_reference(x, 0.5, eps),
                               rtol=1e-5, atol=1e-5)
    if mode != "jit":  # Same eps: the TF implementation agrees to rounding.
        np.testing.assert_allclose(out, _NOISE["tf"][mode](tf.constant(x), 0.5, seed).numpy(),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_noise_statistics_under_jit(impl):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(4096, 4)) * [0.01, 1.0, 10.0, 300.0] + 5.0).astype(np.float32)
    out = _NOISE[impl]["jit"](tf.constant(x), 0.7, tf.constant([9, 9])).numpy()
    z = (out - x) / x.std(axis=0, keepdims=True)
    np.testing.assert_allclose(z.std(axis=0), 0.7, rtol=0.05)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=0.05)


@pytest.mark.parametrize("jit", [False, True])
def test_custom_op_noise_gradient_is_identity(jit):
    x = tf.random.stateless_normal([16, 8], [5, 6])
    w = tf.random.stateless_normal([16, 8], [7, 8])

    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(custom_op.representation_noise(x, 0.5, tf.constant([1, 1])) * w)
        return tape.gradient(total, x)

    if jit:
        grad = tf.function(grad, jit_compile=True)
    assert bits(grad(x).numpy()) == bits(w.numpy())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_custom_op_noise_low_precision(dtype):
    x = tf.cast(tf.constant(_signs(16, 8)), dtype)
    for mode in MODES:
        out = _NOISE["custom_op"][mode](x, 1.0, tf.constant([4, 2]))
        assert out.dtype == x.dtype and out.shape == x.shape
    eps = tf.random.stateless_normal([16, 8], [4, 2]).numpy()
    expected = (_signs(16, 8) + eps).astype(x.dtype.as_numpy_dtype)
    got = _NOISE["custom_op"]["eager"](x, 1.0, tf.constant([4, 2])).numpy()
    assert bits(got) == bits(expected)


# --------------------------------------------------------------------------
# Selection, build failures, perturbation layers


def test_auto_falls_back_with_one_warning_when_the_build_fails(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(build.ENV_CXX, str(tmp_path / "no-such-c++"))
    monkeypatch.setenv(build.ENV_CACHE, str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="simclic_tf.kernels"):
        assert kernels.select("auto").name == "tf"
        assert kernels.select("auto").name == "tf"
    lines = [r.getMessage() for r in caplog.records if r.name == "simclic_tf.kernels"]
    assert len(lines) == 1 and "no-such-c++" in lines[0] and "TensorFlow-function" in lines[0]
    with pytest.raises(build.BuildError, match="cannot run the C\\+\\+ compiler.*no-such-c\\+\\+"):
        kernels.select("custom_op")


def test_compile_errors_are_reported(monkeypatch, tmp_path):
    fake = tmp_path / "failing-c++"
    fake.write_text("#!/bin/sh\necho 'simclic_ops.cc:1: error: no TensorFlow here' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv(build.ENV_CXX, str(fake))
    monkeypatch.setenv(build.ENV_CACHE, str(tmp_path / "cache"))
    with pytest.raises(build.BuildError, match="(?s)exit 1.*no TensorFlow here"):
        kernels.select("custom_op")
    assert not list((tmp_path / "cache").rglob("*.so"))  # Nothing half-built is kept.


def test_cache_folder_is_keyed_by_tensorflow_version():
    path = build.library_path()
    assert path.exists()
    assert path.parent.parent.name == tf.__version__
    assert path.parent.parent.parent == build.cache_root()


@pytest.mark.parametrize("impl", ["tf", "custom_op"])
def test_perturbation_layers_carry_kernel_impl(impl):
    from simclic_tf.config import SimCLICConfig
    from simclic_tf.perturbations import HistoryPerturbation, NoisePerturbation

    config = SimCLICConfig(kernel_impl=impl, proj_dim=8)
    history = HistoryPerturbation.from_run_config(config, num_samples=10)
    assert history.get_config()["kernel_impl"] == impl
    restored = HistoryPerturbation.from_config(history.get_config())
    assert restored.kernel_impl == impl and restored.kernels.name == impl
    z = tf.random.stateless_normal([4, 8], [1, 2])
    (target,) = history((z,), tf.constant([0, 1, 2, 0]), training=True)
    np.testing.assert_allclose(target.numpy(), z.numpy())  # First visits: z itself.
    assert history.visits.numpy()[:4].tolist() == [1, 1, 1, 0]  # Once per call.
    noise = NoisePerturbation.from_run_config(config.replace(perturbation="noise"), 10)
    assert NoisePerturbation.from_config(noise.get_config()).kernel_impl == impl
    (noisy,) = noise((z,), None, training=True)
    assert noisy.shape == z.shape and not np.allclose(noisy.numpy(), z.numpy())


_LOAD_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    import tensorflow as tf
    from simclic_tf.kernels import build, custom_op
    if sys.argv[1] == "before":  # Before any op runs: TF has no XLA kernels yet.
        build.load()
    else:  # TF collects its XLA kernels when the first op runs (or compiles).
        tf.function(lambda x: x * 2.0, jit_compile=True)(tf.constant(1.0))
    bank = tf.Variable(np.zeros((5, 2), np.float32))
    visits = tf.Variable(np.zeros(5, np.int32))
    step = tf.function(custom_op.history_exchange, jit_compile=True)
    step(bank, visits, np.array([1, 1], np.int32), np.array([[1, 2], [3, 4]], np.float32), 0.0)
    noise = tf.function(custom_op.representation_noise, jit_compile=True)
    noise(tf.ones([4, 2]), 0.5, tf.constant([1, 2]))
    assert bank.numpy()[1].tolist() == [2.0, 3.0], bank.numpy()
    print("late", build.late_xla_registrations())
""")


@pytest.mark.parametrize("when", ["before", "after"])
def test_library_loaded_before_or_after_the_first_xla_compile(when):
    result = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, when], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    late = int(result.stdout.split("late")[-1])
    # Loaded first, TF's own collection registers the XLA kernels; loaded
    # after it, the library registers them itself (2 ops x the XLA backends).
    assert (late == 0) if when == "before" else (late >= 2)
