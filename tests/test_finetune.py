"""Fine-tuning: it learns, it leaves the input backbone alone, the backbone
moves at the asked fraction of the head's learning rate, and the CLI reports it."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclic_tf.commands import train
from simclic_tf import sources
from simclic_tf.backbones import build_backbone
from simclic_tf.config import SimCLICConfig
from simclic_tf.finetune import (FineTuneConfig, FineTuner, copy_model, finetune,
                                 finetune_optimizer, predict_classes)
from simclic_tf.optimizers import GroupedSGD


@pytest.fixture(scope="module")
def digits_split():
    return sources.hold_out(sources.load_images("digits"), SimCLICConfig())


def tiny_backbone(shape=(8, 8, 1), seed=0):
    keras.utils.set_random_seed(seed)
    return build_backbone("tiny_convnet", shape, width=4)


def test_finetuning_beats_chance_and_leaves_the_backbone_unchanged(digits_split):
    train_set, test_set = digits_split
    backbone = tiny_backbone()
    before = [w.copy() for w in backbone.get_weights()]
    model = finetune(backbone, train_set, epochs=3, recipe=FineTuneConfig(batch_size=64))
    accuracy = np.mean(predict_classes(model, test_set.images) == test_set.labels)
    assert accuracy > 0.4  # chance is 0.1; about 0.65 for this budget
    after = backbone.get_weights()
    assert all(np.array_equal(b, a) for b, a in zip(before, after))
    assert model.backbone is not backbone
    assert not all(np.array_equal(b, a) for b, a in zip(before, model.backbone.get_weights()))


@pytest.mark.parametrize("scale", [0.1, 0.5])
def test_the_backbone_learns_at_its_fraction_of_the_head_rate(scale):
    """One SGD step from zero momentum moves each weight by -lr * s * (g + wd * w),
    with s the backbone's factor for backbone weights and 1 for the head's."""
    lr, decay = 0.1, 1e-3
    model = FineTuner(copy_model(tiny_backbone()), 10, seed=0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    recipe = FineTuneConfig(backbone_lr_scale=scale, weight_decay=decay)
    model.compile(optimizer=finetune_optimizer(lr, recipe), loss=loss)
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(32, 8, 8, 1)).astype("float32")
    labels = rng.integers(0, 10, 32)

    variables = model.trainable_variables
    before = [v.numpy().copy() for v in variables]
    # Gradients of the same loss on the same batch, computed on a twin (BatchNorm
    # in training mode uses batch statistics, so its forward pass is the step's).
    twin = FineTuner(copy_model(model.backbone), 10, seed=0)
    twin.head.set_weights(model.head.get_weights())
    with tf.GradientTape() as tape:
        value = loss(labels, twin(images, training=True))
    gradients = tape.gradient(value, twin.trainable_variables)
    model.train_on_batch(images, labels)

    backbone_ids = {id(v) for v in model.backbone.trainable_variables}
    assert backbone_ids and len(backbone_ids) < len(variables)  # the head is apart
    for variable, old, gradient in zip(variables, before, gradients):
        factor = scale if id(variable) in backbone_ids else 1.0
        expected = -lr * factor * (gradient.numpy() + decay * old)
        np.testing.assert_allclose(variable.numpy() - old, expected, rtol=1e-3, atol=1e-7,
                                   err_msg=variable.path)


def test_a_compiled_finetuner_saves_and_loads_with_its_optimizer(tmp_path):
    model = FineTuner(tiny_backbone(), 10, seed=0)
    model.compile(optimizer=finetune_optimizer(0.1, FineTuneConfig(backbone_lr_scale=0.2)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(4, 8, 8, 1)).astype("float32")
    model.train_on_batch(images, rng.integers(0, 10, 4))
    model.save(tmp_path / "finetuned.keras")
    loaded = keras.models.load_model(tmp_path / "finetuned.keras", safe_mode=True)
    np.testing.assert_allclose(loaded(images), model(images), rtol=1e-5, atol=1e-6)
    assert isinstance(loaded.optimizer, GroupedSGD)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert loaded.optimizer.groups[0].lr_scale == 0.2
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.e2e
def test_the_cli_reports_fine_tuned_errors(tmp_path):
    run_dir = tmp_path / "run"
    argv = ["--backbone", "tiny_convnet", "--width", "4", "--proj-dim", "32",
            "--pred-hidden", "8", "--batch-size", "64", "--epochs", "1", "--knn-every", "0",
            "--linear-epochs", "2", "--knn-k", "20", "--finetune-epochs", "5",
            "--run-dir", str(run_dir)]
    assert train(argv) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["config"]["finetune_epochs"] == 5
    for encoder in ("pretrained", "random_init"):
        assert set(report[encoder]) == {"knn_accuracy", "linear_accuracy", "finetune_accuracy"}
        # Chance is 0.1; 5 epochs gave 0.25 to 0.31 (2 gave 0.15 to 0.20).
        assert report[encoder]["finetune_accuracy"] > 0.15
    header = next(line for line in (run_dir / "report.md").read_text().splitlines()
                  if line.startswith("| encoder |"))
    assert "| linear error % |" in header and "| fine-tuned error % |" in header
