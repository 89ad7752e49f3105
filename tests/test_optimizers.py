"""GroupedSGD: it steps SimCLIC exactly as the gradient folding it replaced,
it fine-tunes under mixed_float16 as in float32, it serialises, and its
groups give each variable its rate and decay."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from simclic_tf import SimCLIC, SimCLICConfig, build_optimizer
from simclic_tf.backbones import build_backbone
from simclic_tf.finetune import FineTuner, finetune_optimizer
from simclic_tf.optimizers import GroupedSGD, ParameterGroup

IMAGE_SHAPE = (8, 8, 1)
BATCH = 16


class FoldingSGD(keras.optimizers.SGD):
    """A plain SGD given `simclic`'s gradients with L2 and the groups' factors
    folded in, as SimCLIC._sgd_gradients did before GroupedSGD
    (simclic_tf/model.py up to f04fc76): the reference the new path must
    match bit for bit, behind SimCLIC's own train_step."""

    def __init__(self, simclic, **kwargs):
        super().__init__(**kwargs)
        self.simclic = simclic

    def apply_gradients(self, grads_and_vars):
        gradients, variables = zip(*grads_and_vars)
        return super().apply_gradients(zip(self._sgd_gradients(gradients, variables),
                                           variables))

    def _sgd_gradients(self, gradients, variables):
        current = ops.cast(self.learning_rate, "float32")
        decay_scale = ops.cast(self.scale_loss(ops.ones((), "float32")), "float32") / (
            self.simclic.distribute_strategy.num_replicas_in_sync)

        def factor_for(rate):
            return ops.where(current > 0, rate / ops.maximum(current, 1e-30), 0.0)

        config = self.simclic.config
        predictor_factor = (factor_for(config.pred_lr_scale * config.learning_rate)
                            if config.fix_pred_lr else config.pred_lr_scale)
        factors = {v.path: predictor_factor for v in self.simclic.predictor.trainable_variables}
        probe_factor = factor_for(config.online_probe_lr)
        factors.update({v.path: probe_factor for v in self.simclic.probe.trainable_variables})
        no_decay = {v.path for v in self.simclic.probe.trainable_variables}
        scaled = []
        for g, v in zip(gradients, variables):
            if v.path not in no_decay:
                g = g + ops.cast(config.weight_decay * decay_scale, g.dtype) * ops.cast(v, g.dtype)
            scaled.append(g * ops.cast(factors[v.path], g.dtype) if v.path in factors else g)
        return scaled


def schedule_of(optimizer):
    """The learning-rate schedule an optimizer was made with, through its
    public config (`optimizer.learning_rate` is the current rate only)."""
    return keras.optimizers.schedules.deserialize(optimizer.get_config()["learning_rate"])


def probe_config(**changes):
    """A tiny history model of two views (the batches these tests feed) at a
    constant mix: the optimizer's tests, not the default form's."""
    return SimCLICConfig(**{**dict(backbone="tiny_convnet", width=4, proj_dim=16, pred_hidden=8,
                                   batch_size=BATCH, epochs=2, warmup_epochs=1,
                                   online_probe=True, perturbation="history", views=2),
                            **changes})


@pytest.mark.parametrize("fix_pred_lr", [True, False])
def test_simclic_steps_exactly_as_the_folded_gradients(fix_pred_lr):
    """Three steps of a warm-up (lr 0, then lr / 3, 2 lr / 3), the predictor at a
    fixed or scaled rate, the probe at its fixed rate without decay: every
    weight, BatchNorm statistic, history row and momentum bit-identical.
    float32, no XLA (its fusions may round differently in the two graphs)."""
    config = probe_config(fix_pred_lr=fix_pred_lr)
    num_samples = 3 * BATCH
    steps_per_epoch = num_samples // BATCH
    rng = np.random.default_rng(0)
    views = rng.random((3, 2, BATCH) + IMAGE_SHAPE, "float32")
    indices = np.stack([rng.permutation(num_samples)[:BATCH] for _ in range(3)]).astype("int32")
    labels = rng.integers(0, 3, (3, BATCH))
    data = tf.data.Dataset.from_tensor_slices(((views[:, 0], views[:, 1]), indices, labels))

    def trained(optimizer_for):
        keras.utils.set_random_seed(0)
        model = SimCLIC(config, IMAGE_SHAPE, num_samples, num_classes=3)
        model.compile(optimizer=optimizer_for(model), jit_compile=False)
        model.fit(data, epochs=1, shuffle=False, verbose=0)
        return model

    grouped = build_optimizer(config, steps_per_epoch)
    assert float(grouped.learning_rate) == 0.0  # the first step is at lr 0
    new = trained(lambda model: grouped)
    old = trained(lambda model: FoldingSGD(model, learning_rate=schedule_of(grouped),
                                           momentum=config.momentum))

    assert int(new.optimizer.iterations) == 3 and int(old.optimizer.iterations) == 3
    keras.utils.set_random_seed(0)
    start = SimCLIC(config, IMAGE_SHAPE, num_samples, num_classes=3)
    moved = [not np.array_equal(a, b) for a, b in zip(new.get_weights(), start.get_weights())]
    assert sum(moved) > len(moved) // 2
    for a, b, variable in zip(new.get_weights(), old.get_weights(), new.weights):
        np.testing.assert_array_equal(a, b, err_msg=variable.path)
    for a, b in zip(new.optimizer.variables, old.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def one_step_changes(optimizer, variables, gradients):
    before = [v.numpy() for v in variables]
    optimizer.apply_gradients(zip(gradients, variables))
    return [v.numpy() - b for v, b in zip(variables, before)]


def test_build_optimizer_groups_the_predictor_and_the_probe_by_path():
    """On a SimCLIC with a probe, plus a backbone-like variable whose name
    contains "predictor": the first step from zero momentum moves each
    weight by -rate * (g + decay * w), with the group's rate and decay."""
    config = probe_config(warmup_epochs=0, pred_lr_scale=3.0)
    model = SimCLIC(config, IMAGE_SHAPE, 4 * BATCH, num_classes=3)
    with keras.name_scope("my_predictor_head"):
        lookalike = keras.Variable(np.full((3,), 2.0, "float32"), name="kernel")
    assert lookalike.path == "my_predictor_head/kernel"
    variables = model.trainable_variables + [lookalike]
    before = [v.numpy() for v in variables]
    changes = one_step_changes(build_optimizer(config, 4), variables,
                               [ops.ones_like(v) for v in variables])

    lr, decay = config.learning_rate, config.weight_decay
    predictor = {v.path for v in model.predictor.trainable_variables}
    probe = {v.path for v in model.probe.trainable_variables}
    assert predictor and probe
    for variable, old, change in zip(variables, before, changes):
        if variable.path in probe:
            expected = -config.online_probe_lr * np.ones_like(old)
        else:
            rate = 3.0 * lr if variable.path in predictor else lr
            expected = -rate * (1 + decay * old)
        np.testing.assert_allclose(change, expected, rtol=1e-5, err_msg=variable.path)


def test_a_variable_takes_its_first_group_and_else_the_schedules_rate():
    """Decay off skips decay; a fixed rate ignores the schedule; the first
    matching group wins; a variable in no group gets the schedule's rate.
    (atol: a change read off float32 weights near 2 is exact to 2.4e-7.)"""
    optimizer = GroupedSGD(learning_rate=0.5, l2=0.1, groups=[
        ParameterGroup("^a/", lr_scale=0.2, decay=False),
        ParameterGroup("^b/", learning_rate=0.03),
        ParameterGroup("^(a|c)/", lr_scale=3.0),
    ])
    variables = []
    for scope in ("a", "b", "c", "d"):
        with keras.name_scope(scope):
            variables.append(keras.Variable(np.full((2,), 2.0, "float32"), name="w"))
    a, b, c, d = one_step_changes(optimizer, variables, [ops.zeros((2,))] * 4)
    np.testing.assert_array_equal(a, 0.0)  # no decay, no gradient
    np.testing.assert_allclose(b, -0.03 * 0.1 * 2.0, atol=1e-6)
    np.testing.assert_allclose(c, -3.0 * 0.5 * 0.1 * 2.0, atol=1e-6)
    np.testing.assert_allclose(d, -0.5 * 0.1 * 2.0, atol=1e-6)

    weights = [v.numpy() for v in variables]
    a, b, c, d = one_step_changes(optimizer, variables, [ops.ones((2,))] * 4)
    np.testing.assert_allclose(a, -0.2 * 0.5, atol=1e-6)
    np.testing.assert_allclose(b, -0.03 * (1 + 0.1 * weights[1]), atol=1e-6)
    np.testing.assert_allclose(c, -3.0 * 0.5 * (1 + 0.1 * weights[2]), atol=1e-6)
    np.testing.assert_allclose(d, -0.5 * (1 + 0.1 * weights[3]), atol=1e-6)


def test_a_group_takes_a_factor_or_a_fixed_rate_not_both():
    with pytest.raises(ValueError, match="not both"):
        ParameterGroup("x", lr_scale=0.5, learning_rate=0.1)


def test_config_round_trip():
    optimizer = build_optimizer(probe_config(fix_pred_lr=False, pred_lr_scale=2.0), 4)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is GroupedSGD
    assert restored.get_config() == optimizer.get_config()
    assert restored.get_config()["groups"] == [
        {"pattern": "^predictor/", "lr_scale": 2.0, "learning_rate": None, "decay": True},
        {"pattern": "^online_probe/", "lr_scale": None, "learning_rate": 0.1, "decay": False}]
    assert restored.l2 == 5e-4 and restored.momentum == 0.9
    for step in (0, 3, 7):
        assert float(schedule_of(restored)(step)) == float(schedule_of(optimizer)(step))


def finetuned_backbone_change(precision, steps=5):
    """(the backbone's weights before and after `steps` fine-tuning steps,
    flattened; the optimizer) under the global policy `precision`."""
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(32,) + IMAGE_SHAPE).astype("float32")
    labels = rng.integers(0, 10, 32)
    keras.mixed_precision.set_global_policy(precision)
    try:
        keras.utils.set_random_seed(0)
        model = FineTuner(build_backbone("tiny_convnet", IMAGE_SHAPE, width=4), 10, seed=0)
        model.compile(optimizer=finetune_optimizer(0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        before = np.concatenate([v.numpy().ravel() for v in model.backbone.trainable_variables])
        for _ in range(steps):
            model.train_on_batch(images, labels)
        after = np.concatenate([v.numpy().ravel() for v in model.backbone.trainable_variables])
        return before, after, model.optimizer
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_finetuning_under_mixed_float16_moves_the_weights_as_float32():
    """The backbone's change after 5 steps under mixed_float16 within 5 % of
    float32's (float16 rounding). Before GroupedSGD, FineTuner never scaled
    the loss, which Keras's LossScaleOptimizer then unscaled: its change was
    about 3e-5 of float32's (1 / 2**15, the initial loss scale)."""
    start, single, _ = finetuned_backbone_change("float32")
    mixed_start, mixed, optimizer = finetuned_backbone_change("mixed_float16")
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    np.testing.assert_array_equal(start, mixed_start)
    change = single - start
    assert np.linalg.norm(change) / np.linalg.norm(start) > 1e-3
    assert np.linalg.norm((mixed - start) - change) / np.linalg.norm(change) < 0.05
