"""Each perturbation's semantics, at the layer level."""


import numpy as np
import pytest
from keras import ops

from simclic_tf import ConfigError, SimCLICConfig
from simclic_tf.perturbations import (DropoutPerturbation, HistoryPerturbation,
                                      HistoryThenDropout, HistoryThenNoise, NoisePerturbation,
                                      NoPerturbation)


def normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def z():
    return np.random.default_rng(0).normal(size=(512, 64)).astype("float32")


def test_none_is_identity(z):
    (out,) = NoPerturbation()((z,), np.arange(len(z)), training=True)
    np.testing.assert_array_equal(ops.convert_to_numpy(out), z)


def test_dropout_rate_and_inverted_scaling(z):
    (out,) = DropoutPerturbation(strength=0.3, seed=1)((z,), None, training=True)
    out = ops.convert_to_numpy(out)
    dropped = out == 0
    assert dropped.mean() == pytest.approx(0.3, abs=0.01)
    np.testing.assert_allclose(out[~dropped], z[~dropped] / 0.7, rtol=1e-6)
    (out,) = DropoutPerturbation(strength=0.3, seed=1)((z,), None, training=False)
    np.testing.assert_array_equal(ops.convert_to_numpy(out), z)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_noise_scale_is_relative_to_the_batch_std(z, scale):
    z = z * np.linspace(0.1, 10, z.shape[1], dtype="float32")  # very different spreads
    (out,) = NoisePerturbation(strength=scale, seed=3)((z,), None, training=True)
    relative = (ops.convert_to_numpy(out) - z) / z.std(axis=0)
    # Every dimension gets noise of std `scale` times its own batch std.
    np.testing.assert_allclose(relative.std(axis=0).mean(), scale, rtol=0.03)
    assert abs(relative.mean()) < 0.05 * scale


def test_noise_draws_fresh_noise_each_call_and_none_in_inference(z):
    layer = NoisePerturbation(strength=0.5, seed=3)
    (a,), (b,) = layer((z,), None, training=True), layer((z,), None, training=True)
    assert not np.allclose(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
    (c,) = layer((z,), None, training=False)
    np.testing.assert_array_equal(ops.convert_to_numpy(c), z)


def history(strength=1.0, momentum=0.0, num_samples=10, dim=4):
    return HistoryPerturbation(num_samples, dim, strength=strength, momentum=momentum)


def test_history_first_visit_falls_back_to_z_and_writes_the_views_mean():
    layer = history()
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(2, 3, 4)).astype("float32")
    indices = np.array([7, 2, 5], "int32")
    t1, t2 = layer((z1, z2), indices, training=True)
    np.testing.assert_array_equal(ops.convert_to_numpy(t1), z1)
    np.testing.assert_array_equal(ops.convert_to_numpy(t2), z2)
    bank = ops.convert_to_numpy(layer.bank)
    np.testing.assert_allclose(bank[indices], (z1 + z2) / 2, rtol=1e-6)
    untouched = np.setdiff1d(np.arange(10), indices)
    assert not bank[untouched].any()
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.visits), np.isin(np.arange(10), indices))


def test_history_second_visit_reads_back_the_stored_row():
    layer = history(strength=1.0)
    rng = np.random.default_rng(2)
    first, second = rng.normal(size=(2, 3, 4)).astype("float32")
    indices = np.array([0, 9, 4], "int32")
    layer((first,), indices, training=True)
    (target,) = layer((second,), indices, training=True)
    np.testing.assert_allclose(ops.convert_to_numpy(target), normalize(first), rtol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(layer.bank)[indices], second, rtol=1e-6)


@pytest.mark.parametrize("strength", [0.0, 0.3])
def test_history_mix(strength):
    layer = history(strength=strength)
    rng = np.random.default_rng(3)
    old, new = rng.normal(size=(2, 3, 4)).astype("float32")
    indices = np.array([1, 2, 3], "int32")
    layer((old,), indices, training=True)
    (target,) = layer((new,), indices, training=True)
    expected = normalize(strength * normalize(old) + (1 - strength) * normalize(new))
    np.testing.assert_allclose(ops.convert_to_numpy(target), expected, rtol=1e-5, atol=1e-6)


def test_history_momentum_and_read_only_inference():
    layer = history(momentum=0.9)
    rng = np.random.default_rng(4)
    old, new = rng.normal(size=(2, 2, 4)).astype("float32")
    indices = np.array([5, 6], "int32")
    layer((old,), indices, training=True)
    layer((new,), indices, training=True)
    np.testing.assert_allclose(ops.convert_to_numpy(layer.bank)[indices], 0.9 * old + 0.1 * new,
                               rtol=1e-5)
    before = ops.convert_to_numpy(layer.bank).copy()
    (target,) = layer((new,), indices, training=False)
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.bank), before)
    np.testing.assert_allclose(ops.convert_to_numpy(target), normalize(before[indices]), rtol=1e-5)


def test_a_sharded_history_bank_on_one_device_is_the_replicated_one():
    """One replica holds every row whatever --bank-layout says (two replicas:
    tests/test_distribute.py); the layout is saved with the layer."""
    layer = HistoryPerturbation.from_run_config(
        SimCLICConfig(proj_dim=8, bank_layout="sharded"), num_samples=10)
    assert layer.bank.shape == (10, 8) and layer.visits.shape == (10,)
    assert layer.get_config()["bank_layout"] == "sharded"
    z = np.random.default_rng(7).normal(size=(3, 8)).astype("float32")
    layer((z,), np.array([1, 4, 1]), training=True)
    np.testing.assert_array_equal(layer.bank_rows(), ops.convert_to_numpy(layer.bank))
    np.testing.assert_array_equal(layer.visit_counts(), np.isin(np.arange(10), [1, 4]))
    with pytest.raises(ConfigError, match="--bank-layout 'striped'.*replicated, sharded"):
        HistoryPerturbation(10, 8, bank_layout="striped")


def test_history_then_dropout_drops_from_the_history_target():
    layer, plain = HistoryThenDropout(10, 4, seed=2), history()
    rng = np.random.default_rng(4)
    indices = np.array([0, 1, 2])
    for z in rng.normal(size=(2, 3, 4)).astype("float32"):
        (out,), (expected,) = (layer((z,), indices, training=True),
                               plain((z,), indices, training=True))
    out, expected = ops.convert_to_numpy(out), ops.convert_to_numpy(expected)
    kept = out != 0
    assert 0 < kept.sum() < out.size  # some entries dropped at rate 0.2, not all
    np.testing.assert_allclose(out[kept], expected[kept] / 0.8, rtol=1e-5)
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.bank),
                                  ops.convert_to_numpy(plain.bank))


def test_history_then_noise_adds_noise_to_the_history_target_in_training_only():
    layer, plain = HistoryThenNoise(10, 4, seed=2), history()
    z = np.random.default_rng(5).normal(size=(3, 4)).astype("float32")
    for _ in range(2):  # the second visit reads the row the first wrote
        (out,), (expected,) = (layer((z,), np.arange(3), training=True),
                               plain((z,), np.arange(3), training=True))
    difference = ops.convert_to_numpy(out) - ops.convert_to_numpy(expected)
    assert np.abs(difference).min() > 0
    (out,), (expected,) = (layer((z,), np.arange(3), training=False),
                           plain((z,), np.arange(3), training=False))
    np.testing.assert_allclose(ops.convert_to_numpy(out), ops.convert_to_numpy(expected),
                               rtol=1e-6)


def test_the_strength_ramp_is_refused_where_the_strength_is_fixed_at_build():
    with pytest.raises(ConfigError, match="--strength-ramp.*dropout.*history, history\\+"):
        SimCLICConfig(perturbation="dropout", strength_ramp=0.5)
    assert SimCLICConfig(perturbation="history+noise", strength_ramp=0.5).strength_ramp == 0.5
