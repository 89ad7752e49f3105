"""train.py end to end on digits, its errors, and resuming a crashed run."""

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

from simclic_tf.commands import train
from simclic_tf import SimCLICConfig
from simclic_tf import callbacks, training
from simclic_tf.cli import add_config_flags, config_from_args
from simclic_tf.config import derive_pred_lr_scale

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--backbone", "tiny_convnet", "--width", "4", "--proj-dim", "32",
        "--pred-hidden", "8", "--batch-size", "64", "--linear-epochs", "5", "--knn-k", "20"]


def read_history(run_dir):
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def tensorboard_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "logs" / "train"))
    events.Reload()
    return set(events.Tags()["tensors"]) | set(events.Tags()["scalars"])


@pytest.mark.e2e
def test_digits_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train(TINY + ["--epochs", "2", "--run-dir", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["data"] == {"train_images": 1437, "test_images": 360, "image_shape": [8, 8, 1],
                              "num_classes": 10, "storage": "memory",
                              "knn_memory_images": 1437, "knn_classes": 10}
    for encoder in ("pretrained", "random_init"):
        # Even a tiny encoder's features classify digits far above chance (0.1).
        assert report[encoder]["knn_accuracy"] > 0.3
        assert report[encoder]["linear_accuracy"] > 0.3
    assert report["config"]["perturbation"] == "history" and report["collapsed_at_epoch"] is None
    # The predictor's rate was left to the budget: config.json and the report say what it got.
    derived = derive_pred_lr_scale(2 * (1437 // 64))
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["pred_lr_scale"] == derived
    # The default form, derived and saved: one view, its history mix ramped in.
    assert (saved["views"], saved["strength_ramp"]) == (1, 0.5)
    assert report["derived"] == {"pred_lr_scale": derived} and report["steps"] == 44
    assert f"--pred-lr-scale {derived}" in (run_dir / "report.md").read_text()
    console = capsys.readouterr().out.splitlines()
    assert ("Data: training 1437 images 8x8x1 (in memory, 90 KiB decoded); evaluation 360 "
            "images 8x8x1 (in memory, 22 KiB decoded); kNN memory 1437 images" in console)
    assert console[-6].startswith("Pretraining ") and "chance is 10.0 %" in console[-6]
    assert console[-2].startswith("| random initialisation |")
    assert console[-1] == f"Report: {run_dir / 'report.md'}"
    assert "kNN (k=20, t=0.1) error %" in (run_dir / "report.md").read_text()

    rows = read_history(run_dir)
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert float(rows[-1]["knn_accuracy"]) == pytest.approx(report["pretrained"]["knn_accuracy"])
    assert {"epoch_loss", "epoch_z_std", "epoch_knn_accuracy"} <= tensorboard_tags(run_dir)
    assert not (run_dir / "backup").exists()  # removed once training completed
    assert "augmented_views" in tensorboard_tags(run_dir)
    markdown = (run_dir / "report.md").read_text()
    for picture in ("curves.png", "views.png", "embeddings.png"):
        assert f"]({picture})" in markdown
        assert (run_dir / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    encoder = keras.models.load_model(run_dir / "encoder.keras", safe_mode=True)
    assert encoder.output.shape[-1] == 16  # tiny_convnet width 4: 4 x 4 channels
    model = keras.models.load_model(run_dir / "model.keras", safe_mode=True)
    visits = ops.convert_to_numpy(model.perturbation.visits)
    assert visits.sum() == 2 * (1437 // 64) * 64  # every step wrote its batch


def test_a_smaller_second_view_still_exports_an_encoder_of_the_images_shape(tmp_path):
    run_dir = tmp_path / "run"
    assert train(TINY + ["--epochs", "1", "--second-view-size", "4", "--linear-epochs", "0",
                         "--knn-every", "0", "--run-dir", str(run_dir)]) == 0
    assert json.loads((run_dir / "config.json").read_text())["second_view_size"] == 4
    encoder = keras.models.load_model(run_dir / "encoder.keras", safe_mode=True)
    model = keras.models.load_model(run_dir / "model.keras", safe_mode=True)
    assert encoder.input_shape == (None, 8, 8, 1)  # what transfer needs
    assert model.backbone.input_shape == (None, None, None, 1)
    images = np.random.default_rng(0).random((4, 8, 8, 1), "float32")
    np.testing.assert_allclose(encoder(images), model.backbone(images), rtol=1e-5, atol=1e-6)


@pytest.mark.e2e
def test_the_online_probe_is_logged_and_reported_apart(tmp_path):
    run_dir = tmp_path / "run"
    assert train(TINY + ["--epochs", "3", "--online-probe", "--online-probe-lr", "1.0",
                              "--linear-epochs", "0", "--run-dir", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    # A 16-feature encoder, 66 steps on augmented views: well above chance (0.1).
    assert report["online_probe_accuracy"] > 0.25
    assert "Online linear probe" in (run_dir / "report.md").read_text()
    assert "online_probe_accuracy" in read_history(run_dir)[-1]


class Crash(Exception):
    pass


def train_and_crash_at_third_epoch(argv, monkeypatch):
    """`train(argv)`, crashed as the third epoch begins (its backup then holds two)."""
    def crash_at_third_epoch(self, epoch, logs=None):
        if epoch == 2:
            raise Crash()

    with monkeypatch.context() as patch:
        patch.setattr(callbacks.CollapseMonitor, "on_epoch_begin", crash_at_third_epoch,
                      raising=False)
        with pytest.raises(Crash):
            train(argv)


@pytest.mark.e2e
def test_a_crashed_run_resumes_with_its_history_buffer(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    argv = TINY + ["--epochs", "4", "--knn-every", "2", "--run-dir", str(run_dir)]

    train_and_crash_at_third_epoch(argv, monkeypatch)
    assert (run_dir / "backup").exists() and not (run_dir / "report.json").exists()
    assert [row["epoch"] for row in read_history(run_dir)] == ["0", "1"]

    assert train(["--run-dir", str(run_dir), "--resume"]) == 0
    rows = read_history(run_dir)
    assert [row["epoch"] for row in rows] == ["0", "1", "2", "3"]
    # --knn-every 2: after the first epoch, then every second one.
    assert [row["knn_accuracy"] != "NA" for row in rows] == [True, True, False, True]
    model = keras.models.load_model(run_dir / "model.keras", safe_mode=True)
    steps = 1437 // 64
    # Four epochs of writes: the buffer of the first two survived the crash.
    assert ops.convert_to_numpy(model.perturbation.visits).sum() == 4 * steps * 64
    assert int(model.optimizer.iterations) == 4 * steps


@pytest.mark.e2e
def test_the_tfds_path_under_mock_data(tmp_path, mock_tfds):
    run_dir = tmp_path / "run"
    with mock_tfds(num_examples=160):
        assert train(TINY + ["--dataset", "cifar10", "--epochs", "1", "--batch-size", "32",
                                  "--knn-every", "0", "--run-dir", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["data"]["image_shape"] == [32, 32, 3] and report["data"]["num_classes"] == 10
    assert report["data"]["train_images"] + report["data"]["test_images"] >= 160


@pytest.mark.parametrize("argv, words", [
    (["--views", "1", "--perturbation", "none"], ["--views 1", "--perturbation"]),
    (["--perturbation", "noise", "--strength", "20"], ["--strength 20", "0.0 to 10.0"]),
    (["--batch-size", "5000"], ["--batch-size 5000", "1437 images"]),
    (["--dataset", "npz:/nonexistent/x.npz"], ["--dataset", "/nonexistent/x.npz"]),
    (["--backbone", "vgg"], ["--backbone 'vgg'", "resnet18_cifar"]),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as exit_info:
        train(TINY + argv + ["--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    for word in words:
        assert word in message


@pytest.mark.e2e
def test_a_finished_run_is_not_overwritten_and_resume_needs_a_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        train(TINY + ["--run-dir", str(tmp_path / "run")])
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train(["--run-dir", str(tmp_path / "elsewhere"), "--resume"])
    assert "does not exist" in capsys.readouterr().err


def test_flags_are_the_config_fields_and_override_a_config_file(tmp_path):
    import argparse
    parser = add_config_flags(argparse.ArgumentParser())
    (tmp_path / "c.json").write_text(json.dumps({"perturbation": "noise", "width": 8}))
    config = config_from_args(parser.parse_args(
        ["--config", str(tmp_path / "c.json"), "--width", "16", "--no-stop-gradient"]))
    assert (config.perturbation, config.width, config.stop_gradient) == ("noise", 16, False)
    assert np.isclose(config.base_lr, 0.12)


def test_flags_override_a_recipe_and_a_config_file_overrides_it_too(tmp_path):
    import argparse
    parser = add_config_flags(argparse.ArgumentParser())
    assert "a shipped preset, one of: cifar, cpu, paper" in " ".join(
        parser.format_help().split())
    config = config_from_args(parser.parse_args(["--recipe", "paper", "--epochs", "3"]))
    paper = SimCLICConfig.recipe("paper")
    assert config == paper.replace(epochs=3) and config.batch_size == 128
    (tmp_path / "c.json").write_text(json.dumps({"width": 8, "epochs": 5}))
    config = config_from_args(parser.parse_args(
        ["--recipe", "paper", "--config", str(tmp_path / "c.json"), "--epochs", "2"]))
    assert config == paper.replace(width=8, epochs=2)
    with pytest.raises(SystemExit):
        parser.parse_args(["--recipe", "fast"])


@pytest.mark.e2e
def test_deterministic_reruns_are_bit_identical(tmp_path):
    """Two runs of one seed write the same history and weights, bit for bit.
    In subprocesses: op determinism stays on for the rest of a process, and
    TF_ENABLE_ONEDNN_OPTS is read when TensorFlow is imported. (Without
    --deterministic such runs end with different losses.)"""
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0")
    run_dirs = [tmp_path / "first", tmp_path / "second"]
    for run_dir in run_dirs:
        subprocess.run([sys.executable, "train.py"] + TINY + [
            "--dataset", "digits", "--epochs", "2", "--knn-every", "1", "--deterministic",
            "--run-dir", str(run_dir)], cwd=ROOT, env=env, check=True, capture_output=True)
    first, second = (read_history(d) for d in run_dirs)
    for row in first + second:
        assert float(row.pop("seconds")) > 0  # wall time, the one column that may differ
    assert first == second and len(first) == 2
    weights = [keras.models.load_model(d / "model.keras").get_weights() for d in run_dirs]
    assert len(weights[0]) == len(weights[1])
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_deterministic_asks_for_onednn_off_when_it_is_on(monkeypatch, caplog):
    enabled = []
    monkeypatch.setattr(training.tf.config.experimental, "enable_op_determinism",
                        lambda: enabled.append(True))
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    with caplog.at_level(logging.WARNING, logger="simclic_tf.training"):
        training.make_deterministic()
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
        training.make_deterministic()
    assert enabled == [True, True]
    assert [r.getMessage() for r in caplog.records] == [
        "--deterministic: set TF_ENABLE_ONEDNN_OPTS=0 before the run for bit-identical "
        "results on x86 CPUs (oneDNN's kernels)"]


def hparams_session(run_dir):
    """(HParams {name: value}, session status, {scalar tag: value}) that a run's
    TensorBoard logs hold, read as the HParams dashboard reads them."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    events = EventAccumulator(str(run_dir / "logs" / "train"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG])
    hparams = {name: getattr(value, value.WhichOneof("kind"))
               for name, value in start.hparams.items()}
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    scalars = {tag: float(tf.make_ndarray(events.Tensors(tag)[-1].tensor_proto))
               for tag in events.Tags()["tensors"] if tag.startswith(("final/", "random_init/"))}
    return hparams, end.status, scalars


@pytest.mark.e2e
def test_tensorboard_logs_hold_the_runs_hparams_and_final_errors(tmp_path):
    import matplotlib.image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2

    run_dir = tmp_path / "run"
    assert train(TINY + ["--epochs", "1", "--finetune-epochs", "1", "--online-probe",
                         "--run-dir", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    hparams, status, scalars = hparams_session(run_dir)
    config = report["config"]
    assert hparams == {name: "none" if value is None else value
                       for name, value in config.items() if name != "run_dir"}
    assert hparams["proj_dim"] == 32 and hparams["dataset"] == "digits"
    assert status == api_pb2.STATUS_SUCCESS
    expected = {f"{prefix}/{metric}_error": 1 - report[encoder][f"{metric}_accuracy"]
                for encoder, prefix in (("pretrained", "final"), ("random_init", "random_init"))
                for metric in ("knn", "linear", "finetune")}
    expected["final/online_probe_error"] = 1 - report["online_probe_accuracy"]
    assert scalars == pytest.approx(expected, rel=1e-6)

    # The view grid: 8 rows of 8x8 digits beside two views, each enlarged to 64 px.
    assert matplotlib.image.imread(run_dir / "views.png").shape[:2] == (8 * 64, 3 * 64)
    events = EventAccumulator(str(run_dir / "logs" / "train"))
    events.Reload()
    width, height = events.Tensors("augmented_views")[-1].tensor_proto.string_val[:2]
    assert (int(height), int(width)) == (8 * 64, 3 * 64)


@pytest.mark.e2e
def test_tensorboard_logs_of_a_diverged_run_hold_its_hparams_and_random_init_errors(tmp_path):
    from tensorboard.plugins.hparams import api_pb2

    run_dir = tmp_path / "run"
    assert train(TINY + ["--epochs", "3", "--base-lr", "100", "--weight-decay", "0.5",
                         "--momentum", "0.99", "--pred-lr-scale", "1000",
                         "--run-dir", str(run_dir)]) == 1
    report = json.loads((run_dir / "report.json").read_text())
    hparams, status, scalars = hparams_session(run_dir)
    assert hparams["base_lr"] == 100.0 and hparams["pred_lr_scale"] == 1000.0
    assert status == api_pb2.STATUS_FAILURE
    assert scalars == pytest.approx({
        f"random_init/{metric}_error": 1 - report["random_init"][f"{metric}_accuracy"]
        for metric in ("knn", "linear")}, rel=1e-6)
