"""The benchmark's validation set: held-out CIFAR-10 training images, never
the pretraining images and never the test file."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def benchmark(name):
    """The script benchmarks/NAME.py as a module (its folder on the path while it imports)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def accuracy_at_budget():
    if not (SHARED_DATA / "cifar10_train_jpeg.tar.gz").exists():
        pytest.skip(f"{SHARED_DATA} not found: the shared data folder must sit beside the repo")
    return benchmark("accuracy_at_budget")


def test_validation_set_is_balanced_and_disjoint_from_pretraining(accuracy_at_budget, tmp_path):
    path = tmp_path / "validation.npz"
    accuracy_at_budget.write_validation_set(SHARED_DATA, path, per_class=3)
    validation = np.load(path)
    pretraining = np.load(SHARED_DATA / "cifar10_train_10k.npz")
    assert validation["x"].shape == (30, 32, 32, 3) and validation["x"].dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(validation["y"]), [3] * 10)
    assert list(validation["class_names"]) == list(pretraining["class_names"])
    assert not set(validation["source_paths"]) & set(pretraining["source_paths"])
    flat = pretraining["x"].reshape(len(pretraining["x"]), -1)
    for image in validation["x"].reshape(30, -1):
        assert np.abs(flat.astype(np.int16) - image).sum(axis=1).min() > 0
    # Each label is its folder's class, as in the 10k file.
    for label, source in zip(validation["y"], validation["source_paths"]):
        assert source.split("/")[1] == pretraining["class_names"][label]


def test_the_tinyimagenet_split_is_stratified_and_its_parts_disjoint(accuracy_at_budget, tmp_path):
    paths = accuracy_at_budget.write_tinyimagenet_split(SHARED_DATA, tmp_path)
    parts = {part: np.load(path) for part, path in paths.items()}
    sources = [set(part["source_paths"]) for part in parts.values()]
    assert sum(map(len, sources)) == len(set.union(*sources)) == 10000
    for part, per_class in accuracy_at_budget.TINYIMAGENET_SPLIT.items():
        np.testing.assert_array_equal(np.bincount(parts[part]["y"], minlength=200), per_class)
        assert parts[part]["x"].shape == (200 * per_class, 64, 64, 3)
    whole = np.load(SHARED_DATA / "tinyimagenet200_val.npz")
    index = {path: i for i, path in enumerate(whole["source_paths"])}
    test = parts["test"]
    for i in (0, 777, 1999):  # images and labels travel together
        j = index[test["source_paths"][i]]
        assert test["y"][i] == whole["y"][j]
        np.testing.assert_array_equal(test["x"][i], whole["x"][j])


def test_a_flag_given_overrides_a_rival_rows_recipe_but_not_what_defines_it():
    """So that a validation screen can vary a rival's recipe knobs from the command line."""
    from simclic_tf import SimCLICConfig

    rows = benchmark("accuracy_at_budget")
    base = SimCLICConfig(temperature=0.5, queue_size=1024, perturbation="history")
    screened = rows.row_config(base, "simclr", {"temperature": 0.5})
    assert (screened.method, screened.temperature, screened.loss) == ("simclr", 0.5, "nt_xent")
    assert rows.row_config(base, "simclr", {}).temperature == 0.2  # the recipe's
    assert rows.row_config(base, "nnsiam", {"queue_size": 1024}).queue_size == 1024
    byol = rows.row_config(base, "byol", {})
    assert (byol.perturbation, byol.target_momentum) == ("none", 0.99)
    history = rows.row_config(base.replace(perturbation="noise"), "history_ramp_1view",
                              {"perturbation": "noise"})
    assert (history.perturbation, history.views, history.strength_ramp) == ("history", 1, 0.5)


@pytest.fixture(scope="module")
def peer_step():
    return benchmark("peer_step")


def test_peer_step_table_gives_peer_over_ours_and_each_bf16_speed_up(peer_step, capsys):
    peer_step.print_table({"float32": (1.0, 1.5), "mixed_bfloat16": (0.5, 0.75)})
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[-3:] == ["1.0000", "1.5000", "1.500"]
    assert "autocast bfloat16" in lines[3] and lines[3].split()[-1] == "1.500"
    assert lines[4].endswith("ours 2.000, peer 2.000")


def test_peer_step_asks_for_the_peer_venv(peer_step, tmp_path, capsys):
    with pytest.raises(SystemExit):
        peer_step.parse_args(["--peer-python", str(tmp_path / "missing" / "python")])
    assert "benchmarks/peer/requirements.txt" in capsys.readouterr().err


@pytest.mark.e2e
def test_peer_step_runs_both_sides_end_to_end(peer_step):
    """A smoke run (tiny model, two steps) against the peer's venv, when there is one."""
    import subprocess

    if not Path(peer_step.DEFAULT_PEER_PYTHON).exists():
        pytest.skip(f"no peer venv at {peer_step.DEFAULT_PEER_PYTHON} (set PEER_PYTHON)")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "peer_step.py"), "--width", "4", "--batch-size", "8",
         "--proj-dim", "32", "--pred-hidden", "8", "--steps", "1", "--rounds", "1",
         "--warmup-steps", "1", "--num-samples", "64"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "peer/ours" in result.stdout and "bfloat16 speed-up" in result.stdout


@pytest.mark.e2e
def test_budget_timing_prints_each_timings_error_against_the_real_steps(monkeypatch, capsys):
    """A smoke run of benchmarks/budget_timing.py on digits: one round, two timings
    of the round's model and one of a fresh model."""
    budget_timing = benchmark("budget_timing")
    monkeypatch.setattr(sys, "argv", ["budget_timing.py", "--dataset", "digits", "--timed-steps",
                                      "3", "5", "--steps", "12", "--rounds", "1"])
    budget_timing.main()
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:5]]
    assert [row[1] for row in rows] == ["3", "5", "fresh"]
    for row in rows:
        timed, real, error = float(row[2]), float(row[3]), float(row[4].rstrip("%"))
        assert timed > 0 and real > 0
        assert error == pytest.approx(100 * (timed / real - 1), abs=0.2)
    assert [line.split(":")[0] for line in lines[-3:]] == [
        "timed over 3 steps", "timed over 5 steps", "timed over 40 steps of a fresh model"]
