"""The run directory's contract, tested directly: writable before any data
are loaded, one process at a time (a killed holder's lock is taken over),
and one resume comparison for train and tune."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from simclic_tf import SimCLICConfig, rundir
from simclic_tf.commands import command
from simclic_tf.config import ConfigError
from simclic_tf.faults import RunFinished

HOLD_LOCK = """
import sys, time
from simclic_tf import rundir
with rundir.RunDirectory(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """A process that holds the lock on tmp_path/run until killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run")],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    yield process
    process.kill()
    process.wait()


def test_a_second_process_is_refused_naming_the_holder(tmp_path, holder):
    with pytest.raises(rundir.RunDirBusy,
                       match=rf"--run-dir .*run is in use by process {holder.pid} \(.*-c"):
        rundir.RunDirectory(tmp_path / "run").lock()


def test_a_search_into_a_locked_run_dir_is_refused_naming_the_holder(tmp_path, holder,
                                                                      capsys):
    with pytest.raises(SystemExit) as exit_info:
        command("tune")(["--ablation", "loss", "--dataset", "digits", "--run-dir",
                         str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert f"is in use by process {holder.pid}" in capsys.readouterr().err


def test_a_killed_holders_lock_is_taken_over(tmp_path, holder, caplog):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run" / ".lock").exists()  # left behind by the kill
    with rundir.RunDirectory(tmp_path / "run") as run_dir:
        lock = json.loads((tmp_path / "run" / ".lock").read_text())
        assert lock["pid"] == os.getpid()
        assert f"took over the lock left by process {holder.pid}" in caplog.text
    assert not (tmp_path / "run" / ".lock").exists()
    run_dir.lock()  # released, so it can be taken again
    run_dir.release()


def test_the_lock_is_held_until_released_within_one_process(tmp_path):
    first = rundir.RunDirectory(tmp_path)
    first.lock()
    with pytest.raises(rundir.RunDirBusy, match=f"process {os.getpid()}"):
        rundir.RunDirectory(tmp_path).lock()
    first.release()
    with rundir.RunDirectory(tmp_path):
        pass


def test_check_creates_the_folder_and_leaves_nothing_else(tmp_path):
    rundir.RunDirectory(tmp_path / "a" / "b").check()
    assert os.listdir(tmp_path / "a" / "b") == []


def test_a_refused_run_leaves_no_folder_it_created(tmp_path):
    with rundir.RunDirectory(tmp_path / "a" / "b"):
        assert (tmp_path / "a" / "b" / ".lock").exists()
    assert os.listdir(tmp_path) == []
    with rundir.RunDirectory(tmp_path / "a" / "b") as run_dir:
        run_dir.write_json("config.json", {})
    assert os.listdir(tmp_path / "a" / "b") == ["config.json"]


def test_a_run_dir_that_cannot_be_a_folder_is_one_clear_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for path, message in ((afile, "is a file"), (afile / "run", f"cannot be created: {afile} "
                                                               "is a file"),
                          (tmp_path / ("x" * 300), "cannot be a folder: File name too long")):
        with pytest.raises(ConfigError, match=f"^--run-dir {path} {message}"):
            rundir.RunDirectory(path).check()


def without_root_override(command):
    """`command` run so that file permissions bind it: as root, without the
    capability that lets root write anywhere (util-linux's setpriv)."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without util-linux's setpriv to drop CAP_DAC_OVERRIDE")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *command]


def test_an_unwritable_run_dir_is_refused_before_the_data_are_loaded(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # The dataset does not exist either: the run directory's error comes first.
    result = subprocess.run(
        without_root_override([sys.executable, "-m", "simclic_tf.commands", "train",
                               "--run-dir", str(locked), "--dataset", "npz:/nonexistent.npz"]),
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"--run-dir {locked} cannot be written (Permission denied)" in last
    assert "Traceback" not in result.stderr and "nonexistent" not in result.stderr
    assert os.listdir(locked) == []


def saved_run(tmp_path, **changes):
    config = SimCLICConfig(run_dir=str(tmp_path), epochs=3, **changes)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    return config


def test_training_config_refuses_to_start_over_a_run(tmp_path):
    config = saved_run(tmp_path)
    with rundir.RunDirectory(tmp_path) as run_dir, \
            pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        rundir.training_config(run_dir, config, resume=False, given={})


def test_a_resume_takes_the_saved_config_and_refuses_contradicting_flags(tmp_path):
    saved = saved_run(tmp_path, perturbation="noise")
    with rundir.RunDirectory(tmp_path) as run_dir:
        assert rundir.training_config(run_dir, SimCLICConfig(run_dir=str(tmp_path)), True,
                                      {"epochs": 3, "run_dir": "elsewhere"}) == saved
        with pytest.raises(ConfigError, match=r"--epochs 5 \(saved: 3\); --perturbation "
                                              r"history \(saved: noise\)"):
            rundir.training_config(run_dir, saved, True,
                                   {"epochs": 5, "perturbation": "history"})


def test_a_finished_run_names_a_contradicting_flag_before_saying_it_is_finished(tmp_path):
    saved = saved_run(tmp_path)
    (tmp_path / "report.json").write_text("{}")
    with rundir.RunDirectory(tmp_path) as run_dir:
        with pytest.raises(ConfigError, match=r"--epochs 9 \(saved: 3\)"):
            rundir.training_config(run_dir, saved, True, {"epochs": 9})
        with pytest.raises(RunFinished, match="is finished"):
            rundir.training_config(run_dir, saved, True, {"epochs": 3})


def test_contradictions_compare_lists_and_skip_flags_not_given():
    saved = {"tune": ["base_lr"], "objective": "knn", "val_fraction": 0.1}
    assert rundir.contradictions(saved, {"tune": ("base_lr",), "objective": None}) == []
    assert rundir.contradictions(saved, {"tune": ("weight_decay",), "val_fraction": 0.2}) == [
        "--tune weight_decay (saved: base_lr)", "--val-fraction 0.2 (saved: 0.1)"]


def test_resume_checks_the_data_and_reads_the_backups_epoch(tmp_path):
    with rundir.RunDirectory(tmp_path) as run_dir:
        assert rundir.resumed_epoch(run_dir) == 0
        rundir.start_training(run_dir, SimCLICConfig(run_dir=str(tmp_path)), {},
                              {"train_images": 10, "num_classes": 2}, total_steps=10)
        rundir.check_same_data(run_dir, {"train_images": 10, "num_classes": 2})
        with pytest.raises(ConfigError, match=r"train_images 12 \(saved: 10\)"):
            rundir.check_same_data(run_dir, {"train_images": 12, "num_classes": 2})
        (tmp_path / "backup").mkdir()
        (tmp_path / "backup" / "training_metadata.json").write_text('{"epoch": 4}')
        assert rundir.resumed_epoch(run_dir) == 4
    assert json.loads((tmp_path / "config.json").read_text())["run_dir"] == str(tmp_path)


SECOND_WHEN_TRAINING = """
import os, sys, time
from simclic_tf.commands import train  # imported before the wait: the refusal is then at once
history = os.path.join(sys.argv[1], "history.csv")
while not (os.path.exists(history) and len(open(history).read().splitlines()) > 1):
    time.sleep(0.05)
sys.exit(train(sys.argv[2:]))
"""


@pytest.mark.e2e
def test_a_second_run_into_a_training_run_dir_is_refused_and_the_first_finishes(tmp_path):
    run_dir = tmp_path / "run"
    tiny = ["--dataset", "digits", "--backbone", "tiny_convnet", "--width", "4",
            "--proj-dim", "32", "--pred-hidden", "8", "--batch-size", "64", "--epochs", "5",
            "--knn-every", "0", "--linear-epochs", "0", "--run-dir", str(run_dir)]
    second = subprocess.Popen([sys.executable, "-c", SECOND_WHEN_TRAINING, str(run_dir),
                               *tiny, "--resume"], stderr=subprocess.PIPE, text=True)
    first = subprocess.Popen([sys.executable, "-m", "simclic_tf.commands", "train", *tiny],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, first_errors = first.communicate(timeout=600)
    _, refused = second.communicate(timeout=60)
    assert second.returncode == 2, refused
    assert f"is in use by process {first.pid} (" in refused
    assert first.returncode == 0, first_errors
    with open(run_dir / "history.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == list("01234")
    assert (run_dir / "report.json").exists() and not (run_dir / ".lock").exists()
