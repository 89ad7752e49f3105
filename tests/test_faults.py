"""A run that is refused, diverges, is interrupted or resumed loses nothing
and says why in one line: train.py on digits with a tiny encoder."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclic_tf.commands import train
from simclic_tf import SimCLIC, SimCLICConfig
from simclic_tf import callbacks, outputs, sources, training
from simclic_tf import run as run_module
from simclic_tf.callbacks import ResumableCSVLogger

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--backbone", "tiny_convnet", "--width", "4", "--proj-dim", "32",
        "--pred-hidden", "8", "--batch-size", "64", "--linear-epochs", "5", "--knn-k", "20",
        "--knn-every", "0"]


def epochs_in(run_dir):
    with open(run_dir / "history.csv", newline="") as f:
        return [row["epoch"] for row in csv.DictReader(f)]


def refused(argv, capsys):
    """train.main's exit status and error line for a start it must refuse."""
    with pytest.raises(SystemExit) as exit_info:
        train(argv)
    return exit_info.value.code, capsys.readouterr().err.splitlines()[-1]


class Killed(Exception):
    """Stands for a kill -9 at a chosen point of a run."""


def kill(*args, **kwargs):
    raise Killed


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert train(TINY + ["--epochs", "1", "--run-dir", str(run_dir)]) == 0
    return run_dir


# Validate, then write.

@pytest.mark.parametrize("argv, words", [
    (["--batch-size", "5000"], ["--batch-size 5000", "1437 images"]),
    (["--online-probe", "--dataset", "npz:{unlabelled}"], ["--online-probe", "needs labels"]),
])
def test_a_refused_start_leaves_the_run_dir_as_it_found_it(tmp_path, capsys, argv, words):
    np.savez(tmp_path / "unlabelled.npz", x=np.zeros((40, 8, 8, 1), np.uint8))
    np.savez(tmp_path / "eval.npz", x=np.zeros((40, 8, 8, 1), np.uint8), y=np.arange(40) % 2)
    argv = [word.format(unlabelled=tmp_path / "unlabelled.npz") for word in argv]
    if "--online-probe" in argv:
        argv += ["--eval-dataset", f"npz:{tmp_path / 'eval.npz'}", "--batch-size", "8"]
    run_dir = tmp_path / "run"
    code, message = refused(TINY + argv + ["--run-dir", str(run_dir)], capsys)
    assert code == 2 and all(word in message for word in words)
    assert not run_dir.exists()


# Errors, not tracebacks.

def test_a_run_dir_that_cannot_be_a_folder_is_a_clear_error(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for run_dir, words in ((afile, "is a file"), (afile / "run", f"{afile} is a file"),
                           (tmp_path / ("x" * 300), "File name too long")):
        code, message = refused(TINY + ["--run-dir", str(run_dir)], capsys)
        assert code == 2 and f"--run-dir {run_dir}" in message and words in message
    assert afile.read_text() == "not a folder"


@pytest.mark.parametrize("values, words", [
    ({"width": "8"}, ["--width '8'", "an integer from 1 to 1024"]),
    ({"batch_size": 64.5}, ["--batch-size 64.5", "an integer"]),
    ({"stop_gradient": "no"}, ["--stop-gradient 'no'", "true or false"]),
    ({"base_lr": "0.1"}, ["--base-lr '0.1'", "a number"]),
    (["width"], ["a JSON object"]),
])
def test_a_config_file_value_of_the_wrong_type_names_file_and_knob(tmp_path, capsys, values,
                                                                    words):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(values))
    code, message = refused(TINY + ["--config", str(path), "--run-dir", str(tmp_path / "r")],
                            capsys)
    assert code == 2 and f"--config {path}" in message
    assert all(word in message for word in words), message
    assert not (tmp_path / "r").exists()


def test_the_python_api_checks_types_too():
    with pytest.raises(ValueError, match="--epochs 2.5 is not accepted; expected an integer"):
        SimCLICConfig(epochs=2.5)
    with pytest.raises(ValueError, match="--width 8.0 is not accepted; expected an integer"):
        SimCLICConfig(width=8.0)
    # numpy's scalars (a tuner's, an array's shape) are stored as Python's.
    config = SimCLICConfig(base_lr=1, width=np.int64(8), strength=np.float32(0.5))
    assert (type(config.base_lr), type(config.width), type(config.strength)) == (float, int, float)
    assert config.to_dict()["width"] == 8 and json.dumps(config.to_dict())


def test_a_single_class_evaluation_set_is_refused(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 255, (200, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "one.npz", x=images, y=np.zeros(200, np.int64))
    code, message = refused(TINY + ["--dataset", f"npz:{tmp_path / 'one.npz'}",
                                    "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and "a single class" in message and "--eval-dataset" in message
    assert not (tmp_path / "run").exists()


# Resume semantics.

def test_resume_refuses_flags_that_contradict_the_saved_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    SimCLICConfig(dataset="digits", epochs=2, run_dir=str(run_dir)).save(run_dir / "config.json")
    code, message = refused(["--run-dir", str(run_dir), "--resume", "--epochs", "3",
                             "--base-lr", "0.5", "--seed", "0"], capsys)
    assert code == 2
    assert "--base-lr 0.5 (saved: 0.12); --epochs 3 (saved: 2)." in message
    assert "--seed" not in message  # the same value as saved: no contradiction
    assert sorted(os.listdir(run_dir)) == ["config.json"]


@pytest.mark.e2e
def test_resume_on_a_finished_run_says_so_and_changes_nothing(finished_run, capsys):
    before = {name: (finished_run / name).read_bytes()
              for name in ("history.csv", "encoder.keras", "report.json")}
    assert train(["--run-dir", str(finished_run), "--resume"]) == 0
    assert "is finished" in capsys.readouterr().out
    # A flag that contradicts the finished run is named, not passed over.
    code, message = refused(["--run-dir", str(finished_run), "--resume", "--epochs", "3"],
                            capsys)
    assert code == 2 and "--epochs 3 (saved: 1)" in message
    assert {name: (finished_run / name).read_bytes() for name in before} == before


@pytest.mark.e2e
def test_a_run_stopped_while_evaluating_resumes_there_without_training(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(outputs, "draw_results", kill)
        with pytest.raises(Killed):
            train(TINY + ["--epochs", "2", "--run-dir", str(run_dir)])
    assert json.loads((run_dir / "backup" / "training_metadata.json").read_text())["epoch"] == 2
    assert train(["--run-dir", str(run_dir), "--resume"]) == 0
    assert epochs_in(run_dir) == ["0", "1"]
    model = keras.models.load_model(run_dir / "model.keras", safe_mode=True)
    assert int(model.optimizer.iterations) == 2 * (1437 // 64)  # no step trained again
    report = json.loads((run_dir / "report.json").read_text())
    with open(run_dir / "history.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert report["final_z_rank"] == pytest.approx(float(last["z_rank"]))
    assert not (run_dir / "backup").exists()


@pytest.mark.e2e
def test_resume_refuses_data_that_changed_since_the_run_started(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 255, (300, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", x=images, y=np.arange(300) % 3)
    run_dir = tmp_path / "run"
    argv = TINY + ["--dataset", f"npz:{tmp_path / 'set.npz'}", "--linear-epochs", "0",
                   "--run-dir", str(run_dir)]
    with pytest.MonkeyPatch.context() as patch:  # stopped once config.json and data.json exist
        patch.setattr(run_module, "evaluate_backbone", kill)
        with pytest.raises(Killed):
            train(argv + ["--epochs", "1"])
    np.savez(tmp_path / "set.npz", x=images[:240], y=np.arange(240) % 3)
    before = sorted(os.listdir(run_dir))
    code, message = refused(["--run-dir", str(run_dir), "--resume"], capsys)
    assert code == 2 and "the data differ" in message and "train_images 192 (saved: 240)" in message
    assert sorted(os.listdir(run_dir)) == before


def test_resume_of_an_unreadable_saved_config_names_it(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"epochs": 2')
    code, message = refused(["--run-dir", str(tmp_path / "run"), "--resume"], capsys)
    assert code == 2 and f"--resume {tmp_path / 'run' / 'config.json'}: cannot read" in message


def recorded_steps(monkeypatch):
    """The indices of every batch SimCLIC trains on, appended as it trains."""
    steps = []
    train_step = SimCLIC.train_step

    def recording(self, data):
        record = tf.py_function(lambda indices: steps.append(indices.numpy().tolist()),
                                [data[1]], [])
        with tf.control_dependencies([record]):
            return train_step(self, data)

    monkeypatch.setattr(SimCLIC, "train_step", recording)
    return steps


@pytest.mark.e2e
def test_a_resumed_run_trains_on_the_batches_an_uninterrupted_run_does(tmp_path, monkeypatch):
    """Killed at the start of epoch 3 of 4 and resumed, a run trains on the
    batches (indices, in order) that the same run uninterrupted trains on in
    epochs 3 and 4, each epoch a permutation of its own."""
    steps = recorded_steps(monkeypatch)
    argv = TINY + ["--epochs", "4", "--no-jit"]
    assert train(argv + ["--run-dir", str(tmp_path / "whole")]) == 0
    whole, per_epoch = list(steps), 1437 // 64
    epochs = [sum(whole[k:k + per_epoch], []) for k in range(0, len(whole), per_epoch)]
    assert len(epochs) == 4 and all(len(set(epoch)) == per_epoch * 64 for epoch in epochs)
    assert epochs[2] != epochs[0]

    def kill_at_epoch_3(self, epoch, logs=None):
        if epoch == 2:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(callbacks.CollapseMonitor, "on_epoch_begin", kill_at_epoch_3,
                      raising=False)
        with pytest.raises(Killed):
            train(argv + ["--run-dir", str(tmp_path / "killed")])
    steps.clear()
    assert train(argv + ["--run-dir", str(tmp_path / "killed"), "--resume"]) == 0
    assert steps == whole[2 * per_epoch:]


def test_a_resumed_csv_log_never_holds_an_epoch_twice(tmp_path):
    """Rows written after the last checkpoint (a kill between the two, or a
    row cut short) are dropped when training resumes at that epoch."""
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss\n0,0.5\n1,0.4\n2,0.3\n3,0.")
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.fit(np.zeros((4, 1)), np.zeros((4, 1)), epochs=4, initial_epoch=2, verbose=0,
              callbacks=[ResumableCSVLogger(path, append=True)])
    assert [row.split(",")[0] for row in path.read_text().splitlines()] == [
        "epoch", "0", "1", "2", "3"]


@pytest.mark.e2e
def test_a_kill_during_an_export_leaves_no_truncated_file(tmp_path, monkeypatch):
    def killed_mid_write(self, filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"PK\x03\x04 half a zip")
        raise Killed

    monkeypatch.setattr(keras.Model, "save", killed_mid_write)
    run_dir = tmp_path / "run"
    with pytest.raises(Killed):
        train(TINY + ["--epochs", "1", "--run-dir", str(run_dir)])
    assert not [name for name in os.listdir(run_dir) if name.endswith(".keras")]
    json.loads((run_dir / "config.json").read_text())


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from simclic_tf.faults import atomic_path

    path = tmp_path / "report.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as partial:
            Path(partial).write_text("half")
            raise RuntimeError
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]
    with atomic_path(path) as partial:
        assert Path(partial).suffix == ".json"
        Path(partial).write_text("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["report.json"]


# Divergence.

@pytest.mark.e2e
def test_a_diverging_run_stops_at_once_exports_nothing_and_says_so(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = train(TINY + ["--epochs", "3", "--base-lr", "100", "--weight-decay", "0.5",
                              "--momentum", "0.99", "--pred-lr-scale", "1000",
                              "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 1
    [line] = [line for line in err.splitlines() if "DIVERGED" in line]
    assert line.startswith("DIVERGED at epoch ") and "--base-lr (this run: 100)" in line
    assert not [name for name in os.listdir(run_dir) if name.endswith((".keras", ".png"))
                and name != "views.png"]
    report = json.loads((run_dir / "report.json").read_text())
    epoch = report["diverged"]["epoch"]
    assert "pretrained" not in report and f"diverged at epoch {epoch}" in (
        run_dir / "report.md").read_text()
    # Epochs before the divergence are in the log; the diverged one is not.
    assert epochs_in(run_dir) == [str(e) for e in range(epoch - 1)]
    assert train(["--run-dir", str(run_dir), "--resume"]) == 0
    assert "diverged at epoch" in capsys.readouterr().out


@pytest.mark.e2e
def test_a_weight_gone_non_finite_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    def poison_the_predictor(self, epoch, logs=None):
        if epoch == 1:
            kernel = self.model.predictor.trainable_variables[0]
            kernel.assign(np.full(kernel.shape, np.nan, "float32"))

    monkeypatch.setattr(callbacks.CollapseMonitor, "on_epoch_begin", poison_the_predictor,
                        raising=False)
    run_dir = tmp_path / "run"
    assert train(TINY + ["--epochs", "3", "--run-dir", str(run_dir)]) == 1
    assert "DIVERGED at epoch 2, step 1" in capsys.readouterr().err
    metadata = json.loads((run_dir / "backup" / "training_metadata.json").read_text())
    assert metadata["epoch"] == 1
    config = SimCLICConfig.load(run_dir / "config.json")
    model = training.build_model(config, sources.load_train_and_eval(config)[0])
    model.optimizer.build(model.trainable_variables)
    model.load_weights(run_dir / "backup" / "latest.weights.h5")
    assert all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in model.weights)
    assert not (run_dir / "encoder.keras").exists()


# Interruption.

def start_and_signal(run_dir, signum, epochs):
    """Starts train.py, sends `signum` once an epoch has been logged; returns
    (exit status, stderr, seconds from the signal to the exit)."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *TINY, "--linear-epochs", "0", "--epochs",
         str(epochs), "--run-dir", str(run_dir)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (run_dir / "history.csv").exists() and len(epochs_in(run_dir)) >= 1:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read()
    process.send_signal(signum)
    sent = time.time()
    _, err = process.communicate(timeout=120)
    return process.returncode, err, time.time() - sent


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_the_next_step_with_one_line_and_resumes(tmp_path, signum):
    run_dir = tmp_path / "run"
    code, err, seconds = start_and_signal(run_dir, signum, epochs=8)
    assert code == 128 + signum, err
    assert "Traceback" not in err and seconds < 30
    [line] = [line for line in err.splitlines() if line.startswith("Interrupted")]
    name = signal.Signals(signum).name
    # At the end of the step it came in, or at the next epoch's start if it
    # came while the last one was being logged.
    assert re.match(rf"Interrupted by {name}: stopped (at epoch \d+, step \d+|before epoch \d+); "
                    r"the checkpoint \(end of epoch \d+\) is in ", line), line
    assert f"resume with: python train.py --run-dir {run_dir} --resume" in line
    assert (run_dir / "backup").exists() and not (run_dir / "encoder.keras").exists()
    if signum == signal.SIGTERM:
        epochs = len(epochs_in(run_dir))
        assert train(["--run-dir", str(run_dir), "--resume", "--epochs", "8"]) == 0
        assert epochs_in(run_dir) == [str(e) for e in range(8)]
        assert epochs >= 1


def test_a_signal_between_steps_stops_once_the_epoch_is_saved(tmp_path):
    """A signal recorded in an epoch-end monitor stops training at the next
    epoch's start, or after the last epoch, never in the middle of saving."""
    from simclic_tf.callbacks import SignalStop
    from simclic_tf.faults import Interrupted, StopOnSignal

    class SignalInMonitor(keras.callbacks.Callback):
        def __init__(self, stop, at_epoch):
            super().__init__()
            self.stop, self.at_epoch = stop, at_epoch

        def on_epoch_end(self, epoch, logs=None):
            if epoch == self.at_epoch:
                self.stop.received = signal.SIGTERM

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    for at_epoch, where in ((0, "stopped before epoch 2; the checkpoint (end of epoch 1)"),
                            (2, "stopped after the last epoch; the checkpoint (end of epoch 3)")):
        stop = StopOnSignal()
        with pytest.raises(Interrupted, match=where.replace("(", r"\(").replace(")", r"\)")):
            model.fit(np.zeros((4, 1)), np.zeros((4, 1)), epochs=3, verbose=0, callbacks=[
                SignalInMonitor(stop, at_epoch), SignalStop(stop, str(tmp_path))])


# A collapse signal that fires.

@pytest.mark.e2e
def test_stop_on_collapse_ends_simsiam_without_stop_gradient(tmp_path, capsys):
    """The stop-gradient ablation collapses (tests/test_tuning.py holds the
    healthy run quiet on the same budget); --stop-on-collapse ends it there."""
    run_dir = tmp_path / "run"
    assert train(TINY + ["--perturbation", "none", "--no-stop-gradient", "--base-lr", "1.0",
                              "--pred-lr-scale", "1", "--no-fix-pred-lr", "--epochs", "8",
                              "--stop-on-collapse", "--run-dir", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    epoch = report["collapsed_at_epoch"]
    assert epoch is not None and epoch < 8 and report["final_z_rank"] < 0.25
    assert epochs_in(run_dir) == [str(e) for e in range(epoch)]
    assert f"COLLAPSE at epoch {epoch}: z_rank 0." in capsys.readouterr().out
    assert "where --stop-on-collapse ended pretraining" in (run_dir / "report.md").read_text()
