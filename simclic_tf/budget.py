"""`--time-budget`: pretraining sized to a wall-clock budget.

Users pay for time, not for epochs. A budgeted run builds its model, times
its first steps (then undoes them: the run starts from the model as built)
and plans the most epochs it may take at that pace (`plan_length`). A
`BudgetClock` keeps the account: it logs the pretraining seconds spent at
every epoch's end (so a resumed run knows what is left), fits the run's
length and its schedules (cosine, warm-up, ramp, derived predictor rate;
`SimCLIC.fit_to_length`) to the run's own pace at each epoch's end, and
ends training at the budget should the steps slow down past that.
"""

import contextlib
import dataclasses
import logging
import math
import os
import statistics
import tempfile
import time

import keras

from simclic_tf import compat
from simclic_tf.config import ConfigError, parse_duration

logger = logging.getLogger(__name__)

# Steps timed after the first call (trace and compile) and a few more, which
# warm the input pipeline; fewer when they would take more than TIMING_SHARE
# of the budget. On shapes the mean of 10 missed the mean of the run's next
# 400 steps by -9.4 % to +6.6 % (enough to run a 2-minute plan out of time),
# of 40 by -6.7 % to -0.6 % (benchmarks/budget_timing.py, 6 rounds).
TIMED_STEPS, WARMUP_STEPS, TIMING_SHARE = 40, 5, 0.05
# Times a checkpoint save and a kNN evaluation are timed (the fastest is used).
TIMED_REPEATS = 2
# The share of the budget the plan fills at the timed pace: the most steps
# the run may take. `BudgetClock` then fits the length to the run's own pace
# (it ends at FINISH_SHARE), so the plan errs long: planned at 100 %, a run
# whose timing was 12 % slow reached its last planned step at 89 %.
PLANNED_SHARE = 1.2
# The shortest epoch a plan makes: each epoch also costs what the timing does
# not see (a new iterator, the logs and callbacks: 0.2 to 0.3 s here), 4 to 6 %
# of a 5 s epoch (2-minute runs on shapes ran out of time with that floor),
# and more of the fraction-of-a-second passes over a small set.
MIN_EPOCH_SECONDS = 10.0
# An epoch's end not yet seen is reserved this many times its timed parts
# (`BudgetClock`): on digits they took 0.16 s, the whole end 0.24 s.
UNSEEN_EPOCH_END = 2.0
# The share of the budget `BudgetClock` keeps clear of its forecast (a step,
# then the epoch's end, each the slowest seen): a 2-minute run in CI once
# ended 0.07 s past its budget, the forecast met to the last tenth of a second.
GUARD_SHARE = 0.01
# Where `BudgetClock` fits a run's last step to come, at the run's own pace:
# the last epoch's end and the pace's jitter follow it.
FINISH_SHARE = 0.95


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    """What a budgeted run measured and chose.

    Attributes:
      budget_seconds: the budget, pretraining only (evaluation is after it).
      step_seconds: the mean training step over the timed steps.
      timed_steps: how many steps were timed.
      startup_seconds: the model's build and first call (trace and compile),
        spent before the timed steps: the run's fit reuses the trace.
      knn_seconds: one kNN monitor evaluation (0 without the monitor).
      checkpoint_seconds: one save of the model's weights, as the epoch's
        checkpoint (`keras.callbacks.BackupAndRestore`) takes.
      timing_seconds: what the build and timing took, spent from the budget.
      epochs, steps_per_epoch: the length chosen.
    """

    budget_seconds: float
    step_seconds: float
    timed_steps: int
    startup_seconds: float
    knn_seconds: float
    checkpoint_seconds: float
    timing_seconds: float
    epochs: int
    steps_per_epoch: int

    @property
    def steps(self):
        return self.epochs * self.steps_per_epoch

    def describe(self):
        knn = f", the kNN monitor {self.knn_seconds:.1f} s" if self.knn_seconds else ""
        return (f"Time budget {self.budget_seconds:.0f} s: a step takes {self.step_seconds:.3f} s "
                f"(timed over {self.timed_steps} steps of the run's model), its start-up "
                f"{self.startup_seconds:.1f} s{knn}, a checkpoint {self.checkpoint_seconds:.1f} s, "
                f"the start-up and timing {self.timing_seconds:.1f} s; pretraining at most "
                f"{self.epochs} epochs x {self.steps_per_epoch} steps = {self.steps} steps, its "
                "length and schedules fitted to the run's pace at each epoch's end")


def plan_length(config, num_samples, budget_seconds, step_seconds, knn_seconds=0.0,
                checkpoint_seconds=0.0, spent_seconds=0.0):
    """(epochs, steps per epoch) that fill PLANNED_SHARE of `budget_seconds`
    less `spent_seconds` (the model's start-up and the timing) with steps,
    the kNN monitor's evaluations and a checkpoint an epoch: the most the run
    may take. The epochs stay near passes over the data, but none shorter
    than MIN_EPOCH_SECONDS; an explicit `config.steps_per_epoch` is kept and
    the epochs sized instead."""
    if budget_seconds - spent_seconds < step_seconds:
        raise ConfigError(
            f"--time-budget {config.time_budget} is too short for one step: the start-up "
            f"and timing took {spent_seconds:.1f} s and a step takes {step_seconds:.2f} s; "
            f"give at least {math.ceil(2 * (spent_seconds + step_seconds))}s")
    available = PLANNED_SHARE * budget_seconds - spent_seconds
    pass_steps = config.epoch_steps(num_samples)
    monitor_share = knn_seconds / config.knn_every if config.knn_every else 0.0
    epochs = max(1, min(round(available / (pass_steps * step_seconds + monitor_share
                                           + checkpoint_seconds)),
                        math.floor(available / MIN_EPOCH_SECONDS)))
    between_epochs = (knn_evaluations(epochs, config.knn_every) * knn_seconds
                      + epochs * checkpoint_seconds)
    steps = max(1, math.floor((available - between_epochs) / step_seconds))
    if config.steps_per_epoch:
        return max(1, steps // pass_steps), pass_steps
    epochs = min(epochs, steps)
    return epochs, steps // epochs


def knn_evaluations(epochs, every):
    """How many times the kNN monitor runs in `epochs` epochs (after the first and every `every`)."""
    if not every:
        return 0
    return len({0, *range(every - 1, epochs, every)} & set(range(epochs)))


class StepTimer(keras.callbacks.Callback):
    """Times the steps of a fit: the first call (trace and compile), then
    `timed` steps after `warmup` more; stops the fit when done, or once the
    timed steps take `limit_seconds` (at least 3 timed)."""

    def __init__(self, timed, warmup, limit_seconds):
        super().__init__()
        self.timed, self.warmup, self.limit_seconds = timed, warmup, limit_seconds
        self.ends = []

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())
        steps = self.step_intervals()
        if len(steps) >= self.timed or (len(steps) >= 3 and sum(steps) > self.limit_seconds):
            self.model.stop_training = True

    @property
    def first_call_seconds(self):
        return self.ends[0] - self.start

    def step_intervals(self):
        later = self.ends[self.warmup:]
        return [b - a for a, b in zip(later, later[1:])]


def time_epoch_end(model, knn_monitor=None):
    """(checkpoint seconds, kNN monitor seconds; 0 without one): what an
    epoch's end costs `model`, each the fastest of `TIMED_REPEATS`."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "timing.weights.h5")
        checkpoint_seconds = fastest_seconds(lambda: model.save_weights(path))
    knn_seconds = 0.0
    if knn_monitor is not None:
        knn_monitor.accuracy(model.backbone)  # the first also traces the feature extractor
        knn_seconds = fastest_seconds(lambda: knn_monitor.accuracy(model.backbone))
    return checkpoint_seconds, knn_seconds


def timing_steps(timed_steps=TIMED_STEPS):
    """Steps a timing of `timed_steps` trains: the first call, the warm-up, the timed."""
    return 1 + WARMUP_STEPS + timed_steps


def plan_budget(config, num_samples, model, dataset, knn_monitor=None, started=None,
                timed_steps=TIMED_STEPS):
    """The `BudgetPlan` of `config.time_budget` for a training set of
    `num_samples` images: `timed_steps` steps of the run's `model` (built at
    `started`, a `time.perf_counter()`) timed on `dataset` and undone,
    `knn_monitor` (a KNNMonitor) timed once, then the length planned."""
    budget = parse_duration(config.time_budget)
    started = time.perf_counter() if started is None else started
    build_seconds = time.perf_counter() - started
    timer = StepTimer(timed_steps, WARMUP_STEPS, TIMING_SHARE * budget)
    with undone(model):
        model.fit(dataset, epochs=1, steps_per_epoch=timing_steps(timed_steps), verbose=0,
                  callbacks=[timer], shuffle=False)
    steps = timer.step_intervals()
    checkpoint_seconds, knn_seconds = time_epoch_end(model, knn_monitor)
    startup, step = build_seconds + timer.first_call_seconds, statistics.fmean(steps)
    spent = time.perf_counter() - started
    epochs, steps_per_epoch = plan_length(config, num_samples, budget, step, knn_seconds,
                                          checkpoint_seconds, spent)
    return BudgetPlan(budget, step, len(steps), startup, knn_seconds, checkpoint_seconds, spent,
                      epochs, steps_per_epoch)


@contextlib.contextmanager
def undone(model):
    """Runs the block (steps of `model`), then puts every variable of `model`
    and its optimizer (built now, if not yet) back as it was before."""
    strategy = model.distribute_strategy
    with strategy.scope():
        model.optimizer.build(model.trainable_variables)
    # Each replica's copy (a history bank's shard differs from the others').
    copies = [copy for variable in [*model.variables, *model.optimizer.variables]
              for copy in strategy.experimental_local_results(compat.tf_variable(variable))]
    values = [copy.numpy() for copy in copies]
    yield
    for copy, value in zip(copies, values):
        copy.assign(value)


def fastest_seconds(action, times=TIMED_REPEATS):
    """The seconds of the fastest of `times` calls of `action`: one slow call
    (a cold file system, a collection) would otherwise size every epoch's end."""
    seconds = []
    for _ in range(times):
        start = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


class BudgetClock(keras.callbacks.Callback):
    """Adds `seconds`, the pretraining seconds spent so far, to every epoch's
    logs (so history.csv holds it and a resume continues the account). With
    a `budget_seconds`:

    - with `fit_length`, at each epoch's end it fits the run's length to the
      pace of this fit so far (steps and epoch ends, after the first step): the
      steps that end at FINISH_SHARE of the budget, at most the fit's epochs x
      steps; `fit_length(total_steps)` fits the schedules to it, and training
      ends at that step, within an epoch if need be. Runs timed on their
      first steps alone ran from 3 % faster to 12 % slower than timed
      (2-minute runs on shapes).
    - it ends training before a step that, with the epoch's end after it,
      could come within GUARD_SHARE of the budget (the run has then run out
      of time before its schedules' end, and says so). Both are the slowest
      seen (a step after the fit's first, which may trace; an epoch's end, with
      the kNN monitor, checkpoint and logs, at first `epoch_end_seconds`).

    Args:
      spent_seconds: spent before this fit (the timing, or a resumed run's
        last logged `seconds`).
      budget_seconds: None for no budget.
      epoch_end_seconds: what the timed parts of an epoch's end (checkpoint,
        kNN monitor) take. Until an epoch's end is seen, `UNSEEN_EPOCH_END`
        times that is reserved for it: the job's backup (written twice), logs
        and TensorBoard, not timed, add about half again (a resumed run with
        one epoch left ended 0.12 s past its budget on the timed parts alone).
      fit_length: None, or a function of the run's total steps that fits
        its schedules to them (`SimCLIC.fit_to_length`).
    """

    def __init__(self, spent_seconds=0.0, budget_seconds=None, epoch_end_seconds=0.0,
                 fit_length=None):
        super().__init__()
        self.spent_seconds = spent_seconds
        self.budget_seconds = budget_seconds
        self.epoch_end_seconds = UNSEEN_EPOCH_END * epoch_end_seconds
        self.fit_length = fit_length
        self.ran_out = None

    def on_train_begin(self, logs=None):
        self.start, self.end, self.last_batch_end = time.perf_counter(), None, None
        self.slowest_step = 0.0
        self.most_steps = self.end_step = self.params["epochs"] * self.params["steps"]
        self.first_step_end = None

    @property
    def seconds(self):
        """Pretraining seconds spent, this fit's included (up to its end)."""
        return self.spent_seconds + (self.end or time.perf_counter()) - self.start

    def on_epoch_begin(self, epoch, logs=None):
        if self.last_batch_end is not None:
            self.epoch_end_seconds = max(self.epoch_end_seconds,
                                         time.perf_counter() - self.last_batch_end)

    def on_train_batch_begin(self, batch, logs=None):
        self.batch_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        first_of_fit = self.last_batch_end is None
        self.last_batch_end = time.perf_counter()
        if self.budget_seconds is None:
            return
        done = self.model.optimizer.iterations.numpy().item()
        if first_of_fit:
            self.first_step_end = (done, self.last_batch_end)
        else:
            self.slowest_step = max(self.slowest_step, self.last_batch_end - self.batch_start)
        if done >= self.end_step:
            self.model.stop_training = True
        elif (self.seconds + self.slowest_step + self.epoch_end_seconds
                > (1 - GUARD_SHARE) * self.budget_seconds):
            self.ran_out = done
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["seconds"] = self.seconds
        if self.fit_length is not None and self.budget_seconds is not None:
            self.fit_to_pace()

    def fit_to_pace(self):
        """Fits the run's length to end at FINISH_SHARE of the budget at this fit's pace."""
        done = self.model.optimizer.iterations.numpy().item()
        first, first_end = self.first_step_end
        if done <= first or self.model.stop_training:
            return
        pace = (time.perf_counter() - first_end) / (done - first)
        left = FINISH_SHARE * self.budget_seconds - self.seconds
        end_step = min(self.most_steps, done + max(0, math.floor(left / pace)))
        if end_step != self.end_step:
            self.end_step = end_step
            self.fit_length(end_step)
        if done >= end_step:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.end = time.perf_counter()
        if self.ran_out is not None:
            logger.warning("--time-budget: the budget of %.0f s ran out at step %d, before "
                           "the planned end; the learning rate had not decayed to its end "
                           "(the run was slower than its first steps)", self.budget_seconds,
                           self.ran_out)
        elif self.fit_length is not None and self.end_step < self.most_steps:
            logger.warning("--time-budget: pretraining took %d steps of the %d planned, its "
                           "schedules fitted to that length at each epoch's end from the "
                           "run's pace", self.end_step, self.most_steps)
