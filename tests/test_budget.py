"""--time-budget: a run sized to a wall-clock budget."""

import json
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclic_tf import SimCLICConfig
from simclic_tf.budget import (MIN_EPOCH_SECONDS, PLANNED_SHARE, BudgetClock, fastest_seconds,
                               knn_evaluations, plan_length)
from simclic_tf.commands import train
from simclic_tf.config import ConfigError, parse_duration

from test_cli import ROOT, TINY, read_history, train_and_crash_at_third_epoch


def train_in_a_new_process(argv):
    """`python train.py argv`, as a user runs it. A timed run in the suite's
    own process would share it with earlier tests' garbage and threads,
    which slowed its steps past the timing's (the budget ran out 50 steps
    early in CI) though no user's run carries them."""
    result = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200),
                                           ("1.5h", 5400), (" 45 s ", 45)])
def test_durations_are_read_in_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30", "2 minutes", "0m", "-5s", "1d", ""])
def test_a_bad_duration_names_the_flag_and_the_form(text):
    with pytest.raises(ConfigError, match=r"--time-budget .* such as 90s, 30m or 2h"):
        SimCLICConfig(time_budget=text)


def test_epochs_beside_a_time_budget_is_an_error(capsys):
    with pytest.raises(SystemExit):
        train(["--time-budget", "2m", "--epochs", "5", "--run-dir", "unused"])
    assert "--epochs and --time-budget both set how long" in capsys.readouterr().err


def test_the_plan_fills_the_budget_with_whole_epochs_near_passes():
    config = SimCLICConfig(batch_size=100, knn_every=1)  # 1,000 images: 10 steps a pass
    epochs, steps_per_epoch = plan_length(config, 1000, budget_seconds=1000,
                                          step_seconds=1.0, knn_seconds=5,
                                          checkpoint_seconds=2.5, spent_seconds=15)
    available = PLANNED_SHARE * 1000 - 15
    # A pass (10 steps, 10 s), its kNN evaluation (5 s) and checkpoint (2.5 s): 17.5 s.
    assert epochs == round(available / 17.5)
    assert steps_per_epoch == int((available - epochs * 7.5) / 1.0) // epochs
    assert steps_per_epoch in (9, 10)  # near a pass
    used = 15 + epochs * (steps_per_epoch * 1.0 + 7.5)
    assert 0 <= PLANNED_SHARE * 1000 - used < 1.0 * epochs  # less than a step an epoch left


def test_no_planned_epoch_is_shorter_than_the_minimum():
    """Passes of 0.2 s over a small set would make hundreds of epochs, each
    with costs the timing does not see: the plan makes fewer, longer ones."""
    config = SimCLICConfig(batch_size=100, knn_every=0)  # 10 steps a pass of 0.02 s each
    epochs, steps_per_epoch = plan_length(config, 1000, budget_seconds=100,
                                          step_seconds=0.02, spent_seconds=5)
    available = PLANNED_SHARE * 100 - 5
    assert epochs == int(available // MIN_EPOCH_SECONDS) < round(available / 0.2)
    assert steps_per_epoch * 0.02 >= MIN_EPOCH_SECONDS
    assert epochs * steps_per_epoch == pytest.approx(available / 0.02, abs=epochs)


def test_the_plan_keeps_an_explicit_steps_per_epoch():
    config = SimCLICConfig(steps_per_epoch=7, knn_every=0)
    assert plan_length(config, 10_000, 100, 1.0, spent_seconds=2.0) == (
        int(PLANNED_SHARE * 100 - 2) // 7, 7)


def test_a_budget_too_short_for_a_step_is_refused_with_what_it_would_take():
    config = SimCLICConfig(time_budget="10s")
    with pytest.raises(ConfigError, match=r"--time-budget 10s is too short .* at least \d+s"):
        plan_length(config, 1000, 10, step_seconds=1.0, spent_seconds=11.0)


@pytest.mark.parametrize("epochs, every, expected", [(1, 1, 1), (10, 1, 10), (10, 5, 3),
                                                     (4, 2, 3), (10, 0, 0)])
def test_the_knn_monitor_runs_after_the_first_epoch_and_every_nth(epochs, every, expected):
    assert knn_evaluations(epochs, every) == expected


def test_one_slow_save_does_not_size_every_epochs_end():
    # A cold first save once took 1.5 s against 0.13 s after it; planned on,
    # it left a 2-minute run 36 % short of its budget.
    delays = iter([0.5, 0.0])
    assert fastest_seconds(lambda: time.sleep(next(delays))) < 0.1


def test_a_step_as_slow_as_one_seen_before_does_not_carry_the_run_past_its_budget():
    # CI once ended a budgeted run 0.08 s past its 45 s: the clock had
    # expected the next step to take as long as the last.
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    clock, spike = BudgetClock(budget_seconds=2.0), 0.3

    class Spikes(keras.callbacks.Callback):
        """One slow step early, then one wherever it would end past the budget."""

        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2 or clock.seconds + spike > clock.budget_seconds:
                time.sleep(spike)

    batch = np.zeros((8, 4), "float32")
    dataset = tf.data.Dataset.from_tensors((batch, batch[:, :1])).repeat()
    model.fit(dataset, epochs=1, steps_per_epoch=100_000, callbacks=[clock, Spikes()],
              verbose=0)
    assert clock.ran_out is not None
    assert clock.seconds <= clock.budget_seconds


def test_the_clock_fits_the_length_to_the_runs_pace_and_ends_it_there():
    """Planned at 10 epochs of 10 steps, a run whose steps take 0.04 s has
    not the 4 s budget for them: fitted to its pace at each epoch's end, it
    ends at the fitted step, within an epoch, before the budget and not
    short of it."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    fitted = []
    clock = BudgetClock(budget_seconds=4.0, fit_length=fitted.append)

    class SlowSteps(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            time.sleep(0.04)

    batch = np.zeros((8, 4), "float32")
    dataset = tf.data.Dataset.from_tensors((batch, batch[:, :1])).repeat()
    model.fit(dataset, epochs=10, steps_per_epoch=10, callbacks=[clock, SlowSteps()],
              verbose=0)
    assert clock.ran_out is None
    assert int(model.optimizer.iterations) == fitted[-1] == clock.end_step < 100
    assert 0.9 * 4.0 <= clock.seconds <= 4.0


def test_an_epoch_end_not_yet_seen_is_reserved_more_than_its_timed_parts():
    # CI once ended a resumed run, one epoch left, 0.12 s past its 45 s: the
    # job's backup and logs made the epoch's end 0.24 s against 0.16 s timed.
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    timed, whole = 0.3, 0.5
    clock = BudgetClock(budget_seconds=2.0, epoch_end_seconds=timed)

    class UntimedEpochEnd(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            time.sleep(whole)

    batch = np.zeros((8, 4), "float32")
    dataset = tf.data.Dataset.from_tensors((batch, batch[:, :1])).repeat()
    model.fit(dataset, epochs=1, steps_per_epoch=100_000,
              callbacks=[clock, UntimedEpochEnd()], verbose=0)
    assert clock.ran_out is not None
    assert clock.seconds <= clock.budget_seconds


@pytest.mark.e2e
def test_a_two_minute_budget_on_shapes_ends_within_ten_percent_at_the_schedules_end(tmp_path):
    run_dir = tmp_path / "run"
    train_in_a_new_process(["--time-budget", "2m", "--linear-epochs", "0",
                            "--run-dir", str(run_dir)])
    report = json.loads((run_dir / "report.json").read_text())
    budget = report["budget"]
    assert 0.9 * 120 <= budget["seconds"] <= 120, budget
    assert budget["ran_out_at_step"] is None
    # What it planned is in config.json; the run took the steps its pace
    # fitted (at most those), which the report says.
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["time_budget"] == "2m"
    assert (saved["epochs"], saved["steps_per_epoch"]) == (budget["epochs"],
                                                           budget["steps_per_epoch"])
    model = keras.models.load_model(run_dir / "model.keras", safe_mode=True)
    steps = report["steps"]
    assert int(model.optimizer.iterations) == steps <= saved["epochs"] * saved["steps_per_epoch"]
    # The cosine schedule fitted to that length has decayed to its end value.
    schedule = keras.optimizers.schedules.deserialize(
        model.optimizer.get_config()["learning_rate"])
    assert float(schedule(steps)) == pytest.approx(0.0, abs=1e-9)
    assert float(model.optimizer.learning_rate) == pytest.approx(float(schedule(steps)))


@pytest.mark.e2e
def test_a_resumed_budgeted_run_spends_no_more_than_the_budget_in_total(tmp_path,
                                                                        monkeypatch):
    run_dir = tmp_path / "run"
    argv = TINY + ["--time-budget", "45s", "--run-dir", str(run_dir)]

    train_and_crash_at_third_epoch(argv, monkeypatch)
    first = read_history(run_dir)
    assert len(first) == 2
    train_in_a_new_process(["--run-dir", str(run_dir), "--resume"])
    rows = read_history(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    # The resume continued the account from the last logged epoch and kept the length.
    assert float(rows[2]["seconds"]) > float(first[-1]["seconds"])
    assert report["budget"]["seconds"] == pytest.approx(float(rows[-1]["seconds"]), abs=1.0)
    assert report["budget"]["seconds"] <= 45
    # It ended at the length its pace fitted (its schedules' end), or ran out and said so.
    saved = json.loads((run_dir / "config.json").read_text())
    model = keras.models.load_model(run_dir / "model.keras", safe_mode=True)
    assert report["steps"] <= saved["epochs"] * saved["steps_per_epoch"]
    assert (int(model.optimizer.iterations) == report["steps"]
            or report["budget"]["ran_out_at_step"] is not None)
