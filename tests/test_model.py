"""The SimCLIC model: stop-gradient, the SimSiam special case, training and
saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from simclic_tf import SimCLIC, SimCLICConfig, build_optimizer
from simclic_tf.budget import undone
from simclic_tf.optimizers import GroupedSGD

from mix_recorder import MixRecorder

IMAGE_SHAPE = (8, 8, 1)
BATCH = 16


def tiny_model(num_samples=64, num_classes=3, epochs=2, views=2, **changes):
    """A tiny SimCLIC of two views (what `batch` feeds it) unless told otherwise."""
    config = SimCLICConfig(backbone="tiny_convnet", width=4, proj_dim=32, pred_hidden=8,
                           batch_size=BATCH, epochs=epochs, views=views, **changes)
    keras.utils.set_random_seed(0)
    return SimCLIC(config, IMAGE_SHAPE, num_samples, num_classes)


def batch(seed=0, views=2):
    rng = np.random.default_rng(seed)
    images = tuple(rng.random((BATCH,) + IMAGE_SHAPE, "float32") for _ in range(views))
    return images, rng.permutation(64)[:BATCH].astype("int32")


class ConstantPredictor(keras.layers.Layer):
    """A predictor whose output does not depend on z: the loss then reaches
    the encoder through the target branch only."""

    def call(self, z, training=False):
        return ops.ones_like(z) + ops.arange(z.shape[-1], dtype=z.dtype)


@pytest.mark.parametrize("perturbation", ["none", "history", "dropout", "noise"])
@pytest.mark.parametrize("perturb", ["target", "online"])
def test_target_branch_gradients_are_exactly_zero(perturbation, perturb):
    def encoder_gradients(stop_gradient):
        # History's default strength 1 makes the target independent of z; mix
        # in the current z so that the check below can fail.
        strength = 0.5 if perturbation == "history" else None
        model = tiny_model(perturbation=perturbation, perturb=perturb,
                           stop_gradient=stop_gradient, strength=strength)
        model.predictor = ConstantPredictor()
        variables = model.backbone.trainable_variables + model.projector.trainable_variables
        views, indices = batch()
        if perturbation == "history":  # a second visit, so the target reads the buffer
            model.compute_objective(views, indices, training=True)
        with tf.GradientTape() as tape:
            loss = model.compute_objective(views, indices, training=True).loss
        return [g for g in tape.gradient(loss, variables) if g is not None]

    assert encoder_gradients(stop_gradient=True) == []
    # The check can fail: without stop-gradient the same path carries gradient.
    assert any(np.abs(g.numpy()).max() > 0 for g in encoder_gradients(stop_gradient=False))


def test_perturbation_none_is_a_hand_written_simsiam_step():
    # Every weight at one learning rate, as in the paper's Algorithm 1.
    model = tiny_model(perturbation="none", base_lr=0.5, pred_lr_scale=1.0, fix_pred_lr=False)
    model.compile(optimizer=GroupedSGD(0.1, momentum=0.9, l2=model.config.weight_decay))
    reference = tiny_model(perturbation="none")
    reference.set_weights(model.get_weights())
    (x1, x2), indices = batch()

    # SimSiam (Chen & He 2021, Algorithm 1) written out by hand.
    def cosine(p, z):
        return tf.reduce_sum(tf.math.l2_normalize(p, -1) * tf.math.l2_normalize(z, -1), -1)

    variables = reference.trainable_variables
    with tf.GradientTape() as tape:
        z1 = reference.projector(reference.backbone(x1, training=True), training=True)
        z2 = reference.projector(reference.backbone(x2, training=True), training=True)
        p1, p2 = reference.predictor(z1, training=True), reference.predictor(z2, training=True)
        loss = -tf.reduce_mean(cosine(p1, tf.stop_gradient(z2))) / 2 \
            - tf.reduce_mean(cosine(p2, tf.stop_gradient(z1))) / 2
    gradients = tape.gradient(loss, variables)
    expected = [v.numpy() - 0.1 * (g.numpy() + 5e-4 * v.numpy())  # first SGD step: no momentum yet
                for v, g in zip(variables, gradients)]

    logs = model.train_step(((x1, x2), indices))
    assert float(logs["loss"]) == pytest.approx(float(loss), abs=1e-6)
    for actual, wanted in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(actual.numpy(), wanted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale, fixed", [(0.0, False), (3.0, False), (1.0, True), (2.0, True)])
def test_the_predictor_learning_rate(scale, fixed):
    """One SGD step at a quarter of the peak learning rate: the encoder moves by
    that rate, the predictor by `scale` times it, or `scale` times the peak if fixed."""
    peak, current = 0.4, 0.1
    model = tiny_model(perturbation="none", pred_lr_scale=scale, fix_pred_lr=fixed,
                       base_lr=peak * 256 / BATCH, weight_decay=0.0)
    # build_optimizer's groups, at a constant rate below the peak.
    groups = build_optimizer(model.config, 512 // BATCH).groups
    model.compile(optimizer=GroupedSGD(current, groups=groups))
    variables = model.trainable_variables
    before = [v.numpy() for v in variables]
    data = batch()
    with tf.GradientTape() as tape:
        loss = model.compute_objective(*data, training=True).loss
    gradients = tape.gradient(loss, variables)
    model.train_step(data)
    predictor = {v.path for v in model.predictor.trainable_variables}
    assert predictor
    for v, b, g in zip(variables, before, gradients):
        rate = (peak if fixed else current) * scale if v.path in predictor else current
        np.testing.assert_allclose(v.numpy(), b - rate * g.numpy(), rtol=1e-4, atol=1e-6)


def test_the_online_probe_learns_without_steering_the_encoder():
    labels = np.arange(BATCH, dtype="int32") % 3
    with_probe = tiny_model(perturbation="none", online_probe=True)
    without = tiny_model(perturbation="none")
    with pytest.raises(ValueError, match="--online-probe needs labels"):
        tiny_model(online_probe=True, num_classes=None)
    for model in (with_probe, without):
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    views, indices = batch()
    probe_before = with_probe.probe.kernel.numpy()
    logs = with_probe.train_step((views, indices, labels))
    without.train_step((views, indices))
    assert 0.0 <= float(logs["online_probe_accuracy"]) <= 1.0
    assert np.abs(with_probe.probe.kernel.numpy() - probe_before).max() > 0
    for a, b in zip(with_probe.backbone.weights + with_probe.predictor.weights,
                    without.backbone.weights + without.predictor.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


def test_views_one_uses_a_single_branch():
    model = tiny_model(perturbation="history", views=1)
    (x,), indices = batch(views=1)
    loss = model.compute_objective((x,), indices, training=True).loss
    # First visit: the target falls back to z, so the loss is D(h(z), z).
    z = model.encode(x, training=True)
    p = model.predictor(z, training=True)
    cosine = ops.sum(ops.normalize(p, axis=-1) * ops.normalize(z, axis=-1), axis=-1)
    assert float(loss) == pytest.approx(-float(ops.mean(cosine)), abs=1e-5)


def test_a_smaller_second_view_trains_the_one_backbone_at_both_sizes():
    model = tiny_model(second_view_size=4)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    (x1, x2), indices = batch()
    small = ops.convert_to_numpy(ops.image.resize(x2, (4, 4)))
    before = [w.numpy() for w in model.backbone.trainable_weights]
    loss = model.compute_objective((x1, small), indices, training=True).loss
    # First visit: the targets fall back to z, each view's through the one backbone.
    z1, z2 = model.encode(x1, training=True), model.encode(small, training=True)

    def cosine(p, z):
        return ops.mean(ops.sum(ops.normalize(p, axis=-1) * ops.normalize(z, axis=-1), axis=-1))
    expected = -(cosine(model.predictor(z1, training=True), z2)
                 + cosine(model.predictor(z2, training=True), z1)) / 2
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)
    logs = model.train_step(((x1, small), indices))
    assert np.isfinite(float(logs["loss"]))
    after = [w.numpy() for w in model.backbone.trainable_weights]
    assert all(not np.array_equal(a, b) for a, b in zip(before, after))


def test_a_training_step_writes_the_views_mean_into_history():
    model = tiny_model(perturbation="history")
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # weights fixed: z is reproducible
    (x1, x2), indices = batch()
    expected = (model.encode(x1, training=True) + model.encode(x2, training=True)) / 2
    model.train_step(((x1, x2), indices))
    bank = ops.convert_to_numpy(model.perturbation.bank)
    np.testing.assert_allclose(bank[indices], ops.convert_to_numpy(expected), rtol=1e-5, atol=1e-6)
    visits = ops.convert_to_numpy(model.perturbation.visits)
    assert visits[indices].tolist() == [1] * BATCH and visits.sum() == BATCH


def fit_digits(model, epochs):
    from sklearn.datasets import load_digits
    images = (load_digits().images[..., None] / 16).astype("float32")[:512]
    rng = np.random.default_rng(0)

    def jitter():  # two cheap, different views
        return np.clip(images + rng.normal(0, 0.1, images.shape), 0, 1).astype("float32")

    data = tf.data.Dataset.from_tensor_slices(
        ((jitter(), jitter()), np.arange(len(images), dtype="int32"))).batch(BATCH)
    return model.fit(data, epochs=epochs, verbose=0, shuffle=False).history


@pytest.mark.parametrize("perturbation", ["none", "history"])
def test_fit_lowers_the_loss(perturbation):
    model = tiny_model(num_samples=512, perturbation=perturbation, base_lr=0.1)
    model.compile(optimizer=build_optimizer(model.config, 512 // BATCH))
    history = fit_digits(model, epochs=4)
    assert history["loss"][-1] < history["loss"][0] - 0.1
    assert history["z_std"][-1] > 0.2 / np.sqrt(32)


def test_model_fit_alone_ramps_the_history_mix_from_zero_to_the_strength():
    # 4 steps an epoch, 2 epochs: the ramp's half of the run is 4 steps.
    model = tiny_model(num_samples=64, perturbation="history", strength=0.8,
                       strength_ramp=0.5)
    model.compile(optimizer=build_optimizer(model.config, 64 // BATCH))
    views, _ = batch()
    data = tf.data.Dataset.from_tensor_slices(
        ((np.tile(views[0], (4, 1, 1, 1)), np.tile(views[1], (4, 1, 1, 1))),
         np.arange(64, dtype="int32"))).batch(BATCH)
    recorder = MixRecorder()
    history = model.fit(data, epochs=2, verbose=0, callbacks=[recorder]).history
    np.testing.assert_allclose(recorder.mixes, [0.0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8, 0.8],
                               rtol=1e-6)
    # Each epoch's logs (history.csv, TensorBoard) hold the mix of its last step.
    np.testing.assert_allclose(history["mix"], [0.6, 0.8], rtol=1e-6)
    # The target follows the mix in use: at a = 0.8, 0.8 H^ + 0.2 z^, normalised.
    z, old = np.random.default_rng(6).normal(size=(2, 3, 32)).astype("float32")
    layer = model.perturbation
    layer((old,), np.arange(3), training=True)
    (out,) = layer((z,), np.arange(3), training=False)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(ops.convert_to_numpy(out),
                               unit(0.8 * unit(old) + 0.2 * unit(z)), rtol=1e-5)


def test_without_a_ramp_the_mix_is_the_strength_from_the_first_step():
    model = tiny_model(num_samples=64, perturbation="history", strength=0.7)
    model.compile(optimizer=build_optimizer(model.config, 64 // BATCH))
    views, indices = batch()
    recorder = MixRecorder()
    model.fit(tf.data.Dataset.from_tensors((views, indices)), verbose=0, callbacks=[recorder])
    np.testing.assert_allclose(recorder.mixes, [0.7], rtol=1e-6)


def test_a_model_timed_then_fitted_to_its_length_trains_as_one_built_for_it(tmp_path):
    """--time-budget times the run's own model (then undoes the steps) before
    it knows its length: fitted to it, the traced step must follow every
    schedule of the length (warm-up and cosine, the derived predictor rate,
    the strength ramp, BYOL's momentum), as a model built for it does."""
    knobs = dict(num_samples=64, perturbation="history", strength_ramp=0.5, warmup_epochs=1,
                 target_momentum=0.99)
    # Built for 2 epochs of 4 steps; fitted to 1,000 of 3 (3,000 steps: a
    # predictor factor below the 30 of short runs, a 3-step warm-up).
    timed = tiny_model(**knobs)
    built = tiny_model(**knobs, steps_per_epoch=3, epochs=1000)
    for model in (timed, built):
        model.compile(optimizer=build_optimizer(model.config, model.config.epoch_steps(64)))
    views, indices = batch()
    data = tf.data.Dataset.from_tensors((views, indices)).repeat(6)
    with undone(timed):
        timed.fit(data, epochs=1, steps_per_epoch=2, verbose=0)
    timed.fit_to_length(1000, 3)
    assert timed.config == built.config and timed.config.pred_lr_scale < 30
    for model in (timed, built):
        model.fit(data, epochs=1, steps_per_epoch=6, verbose=0)
    assert int(timed.optimizer.iterations) == 6
    for got, expected in zip(timed.variables, built.variables):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=got.path)
    # Saved, the model and its optimizer say the fitted length.
    timed.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    assert loaded.config == built.config
    assert ({**loaded.optimizer.get_config(), "name": None}
            == {**built.optimizer.get_config(), "name": None})


def test_keras_file_round_trip_keeps_the_history_buffer(tmp_path):
    model = tiny_model(num_samples=512, perturbation="history", bank_dtype="bfloat16")
    model.compile(optimizer=build_optimizer(model.config, 512 // BATCH))
    fit_digits(model, epochs=1)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    assert isinstance(loaded, SimCLIC) and loaded.config == model.config
    assert loaded.perturbation.bank.dtype == "bfloat16"
    for name in ("bank", "visits"):
        original = ops.convert_to_numpy(getattr(model.perturbation, name))
        np.testing.assert_array_equal(ops.convert_to_numpy(getattr(loaded.perturbation, name)),
                                      original)
    assert ops.convert_to_numpy(model.perturbation.visits).min() == 1
    images = batch()[0][0]
    np.testing.assert_allclose(ops.convert_to_numpy(loaded(images)),
                               ops.convert_to_numpy(model(images)), rtol=1e-5, atol=1e-6)
    fit_digits(loaded, epochs=1)  # the loaded model trains on (optimizer restored)
    assert ops.convert_to_numpy(loaded.perturbation.visits).min() == 2


def users_backbone(pool=True):
    inputs = keras.Input(IMAGE_SHAPE)
    x = keras.layers.Conv2D(6, 3, activation="relu")(inputs)
    outputs = keras.layers.GlobalAveragePooling2D()(x) if pool else x
    return keras.Model(inputs, outputs, name="my_encoder")


def test_a_users_keras_model_is_the_backbone_and_saves_with_the_model(tmp_path):
    config = SimCLICConfig(backbone="tiny_convnet", width=4, proj_dim=32, pred_hidden=8,
                           batch_size=BATCH, epochs=1, perturbation="history")
    keras.utils.set_random_seed(0)
    backbone = users_backbone()
    model = SimCLIC(config, IMAGE_SHAPE, 512, backbone=backbone)
    assert model.backbone is backbone
    model.compile(optimizer=build_optimizer(model.config, 512 // BATCH))
    before = backbone.get_weights()[0].copy()
    fit_digits(model, epochs=1)
    assert not np.array_equal(backbone.get_weights()[0], before)  # it was trained
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert loaded.backbone.name == "my_encoder"
    images = batch()[0][0]
    np.testing.assert_allclose(ops.convert_to_numpy(loaded(images)),
                               ops.convert_to_numpy(model(images)), rtol=1e-5, atol=1e-6)


def test_a_backbone_that_returns_a_feature_map_is_refused():
    with pytest.raises(ValueError, match="feature vectors.*my_encoder.*GlobalAveragePooling2D"):
        SimCLIC(SimCLICConfig(batch_size=BATCH), IMAGE_SHAPE, 64,
                backbone=users_backbone(pool=False))
