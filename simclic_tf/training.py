"""Everything a pretraining run needs, built from its config alone: the one
assembly that `simclic train`, the tuner, the benchmarks and a library user
share, so that a knob acts the same wherever the config is used.

    pretraining = build_pretraining(config, train_set)
    pretraining.fit()                     # model.fit with its input and schedule
    pretraining.model.backbone            # the encoder
"""

import dataclasses
import functools
import gc
import logging
import math
import os
import time
from typing import Optional

import keras
import tensorflow as tf

from simclic_tf import augment, distribute, pipelines
from simclic_tf.budget import (TIMED_STEPS, BudgetClock, BudgetPlan, parse_duration,
                               plan_budget, time_epoch_end, timing_steps)
from simclic_tf.callbacks import CollapseMonitor, DivergenceGuard, KNNMonitor
from simclic_tf.config import ConfigError
from simclic_tf.model import SimCLIC, build_optimizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Pretraining:
    """A compiled SimCLIC model, its input and what `model.fit` needs.

    Attributes:
      config: the run's config, its budget-derived knobs filled in
        (`derived`: {knob: value} of those; with a time budget, the model's
        config says them at the length the run ends with).
      model: the compiled `SimCLIC` (optimizer, schedules and ramp inside).
      augmentation: the views' augmentation layer (seeded by `config.seed`).
      dataset: the distributed pretraining input from `initial_epoch` on.
      steps_per_epoch, initial_epoch: for `model.fit`.
      callbacks: those that only observe or stop (collapse alarm, kNN
        monitor, divergence guard, budget clock); `fit` runs them before any
        of the caller's.
      budget: with `config.time_budget`, the `BudgetPlan` that sized the run
        (None when resumed: the saved length is kept).
      precision_pick: with `--precision auto`, what it picked and why
        (`config.precision` holds the pick).
    """

    config: object
    model: SimCLIC
    augmentation: keras.layers.Layer
    dataset: tf.data.Dataset
    steps_per_epoch: int
    initial_epoch: int = 0
    callbacks: tuple = ()
    budget: Optional[BudgetPlan] = None
    precision_pick: Optional[str] = None

    @property
    def total_steps(self):
        """The run's length in steps, which a budgeted run fits to its pace as it goes."""
        return self.model.run_steps

    @property
    def derived(self):
        """{knob: value} of the knobs derived from the run's length."""
        return self.model.derived

    @property
    def collapse_monitor(self):
        return next(c for c in self.callbacks if isinstance(c, CollapseMonitor))

    @property
    def clock(self):
        """The `BudgetClock`: pretraining seconds spent, and whether a budget ran out."""
        return next(c for c in self.callbacks if isinstance(c, BudgetClock))

    def fit(self, callbacks=(), **kwargs):
        """`model.fit` over the config's epochs; returns its History."""
        return self.model.fit(self.dataset, epochs=self.config.epochs,
                              initial_epoch=self.initial_epoch,
                              steps_per_epoch=self.steps_per_epoch, shuffle=False,
                              callbacks=[*self.callbacks, *callbacks], **kwargs)


def build_pretraining(config, train_set, strategy=None, initial_epoch=0, memory=None,
                      queries=None, spent_seconds=0.0):
    """The `Pretraining` of `config` on `train_set` (an `images.Images`) under
    `strategy` (default: the current one), from `initial_epoch` on. With a
    labelled kNN `memory` and `queries`, and `config.knn_every`, its callbacks
    add kNN accuracy to the epoch logs.

    With `config.time_budget`, a new run (`initial_epoch` 0, nothing spent)
    is sized to the budget on its model's first steps (`size_to_budget`); a
    resumed one keeps its saved length and has the budget less
    `spent_seconds` (its last logged `seconds`) left. Pretraining seconds
    count from this call.
    """
    if config.time_budget:
        # The garbage of earlier fits in this process (a notebook's, a test
        # suite's) collected now: mid-run, a collection that ends a tf.data
        # iterator waits seconds on its threads, time the plan never saw.
        gc.collect()
    started = time.perf_counter()
    strategy = strategy or tf.distribute.get_strategy()
    precision_pick = None
    if config.precision == "auto":
        policy, why = distribute.pick_precision()
        config, precision_pick = config.replace(precision=policy), f"{policy}: {why}"
        logger.warning("--precision auto: %s", precision_pick)
    knn_monitor = None
    if config.knn_every and memory is not None and queries is not None:
        knn_monitor = KNNMonitor(memory, queries, config.knn_k, config.knn_t, config.knn_every)
    model = build_model(config, train_set, strategy)
    plan = None
    if config.time_budget and not initial_epoch and not spent_seconds:
        plan = size_to_budget(config, train_set, model, knn_monitor, started)
        config = config.replace(epochs=plan.epochs, steps_per_epoch=plan.steps_per_epoch)
        model.fit_to_length(plan.epochs, plan.steps_per_epoch)
        logger.warning("%s", plan.describe())
    steps_per_epoch = config.epoch_steps(len(train_set))
    config, _ = config.for_budget(steps_per_epoch)
    augmentation, dataset = pretrain_inputs(config, train_set, strategy, initial_epoch)
    budget_seconds, epoch_end_seconds = None, 0.0
    if config.time_budget:
        budget_seconds = parse_duration(config.time_budget)
        epoch_end_seconds = sum((plan.checkpoint_seconds, plan.knn_seconds) if plan
                                else time_epoch_end(model, knn_monitor))
    clock = BudgetClock(spent_seconds + time.perf_counter() - started, budget_seconds,
                        epoch_end_seconds, fit_length=functools.partial(
                            model.fit_to_length, config.epochs, steps_per_epoch))
    return Pretraining(config, model, augmentation, dataset, steps_per_epoch, initial_epoch,
                       observers(config, knn_monitor, clock), plan, precision_pick)


def size_to_budget(config, train_set, model, knn_monitor=None, started=None,
                   timed_steps=TIMED_STEPS):
    """The `BudgetPlan` of `config.time_budget`: `timed_steps` steps of the
    run's `model` (built at `started`, a `time.perf_counter()`) on an input
    built as the run's, timed (with `knn_monitor`'s evaluation) and undone."""
    passes = math.ceil(timing_steps(timed_steps) / config.epoch_steps(len(train_set)))
    probe = config.replace(epochs=passes, time_budget=None)
    _, dataset = pretrain_inputs(probe, train_set, model.distribute_strategy)
    plan = plan_budget(config, len(train_set), model, dataset, knn_monitor, started,
                       timed_steps)
    # Collected now, the timing's tf.data iterator goes in 0.2 s; left to a
    # collection mid-run, its end waited on its autotune thread 17 to 54 s.
    del dataset
    gc.collect()
    return plan


def observers(config, knn_monitor=None, clock=None):
    """The callbacks that only observe or stop, in the order their values
    must reach later callbacks' logs: the collapse alarm (which stops the run
    with `config.stop_on_collapse`), the kNN monitor, the divergence guard,
    and the budget clock (whose `seconds` then count the monitor's time)."""
    callbacks = [CollapseMonitor(config.proj_dim, stop=config.stop_on_collapse)]
    if knn_monitor is not None:
        callbacks.append(knn_monitor)
    return (*callbacks, DivergenceGuard(config), clock or BudgetClock())


def build_model(config, train_set, strategy=None):
    """A compiled SimCLIC model for this config and training set: the
    `--precision` policy and `--deterministic` set, model, optimizer and
    metrics created under `strategy.scope()` (default: the current strategy),
    `--jit` applied. model.fit then splits each global batch of `batch_size`
    across replicas."""
    strategy = strategy or tf.distribute.get_strategy()
    distribute.set_precision(config.precision)
    if config.deterministic:
        make_deterministic()
    steps_per_epoch = config.epoch_steps(len(train_set))
    num_classes = train_set.num_classes if train_set.labels is not None else None
    with strategy.scope():
        model = SimCLIC(config, train_set.image_shape, len(train_set), num_classes)
        model.compile(optimizer=build_optimizer(config, steps_per_epoch),
                      jit_compile=distribute.jit_compile(config.jit, strategy))
    return model


def pretrain_inputs(config, train_set, strategy=None, initial_epoch=0):
    """(augmentation, pretraining dataset) for this config from `initial_epoch`
    on, distributed for `strategy` (default: the current one); train on it
    with fit(steps_per_epoch=config.epoch_steps(len(train_set))). SimSiam's
    augmentation seeded by `config.seed` (with `config.second_view_size`, the
    second view's its own, cropping to that size), and labels in the batches
    when the online probe needs them."""
    shape = train_set.image_shape
    crop_scale = (config.crop_min_scale, 1.0)
    augmentation = augment.build_augmentation(shape[:2], shape[-1], crop_scale=crop_scale,
                                              seed=config.seed)
    augments = augmentation
    if config.second_view_size:
        if config.second_view_size > min(shape[:2]):
            raise ConfigError(f"--second-view-size {config.second_view_size} is larger than "
                              f"the images ({shape[0]}x{shape[1]}); give at most "
                              f"{min(shape[:2])}, or 0 for the images' own size")
        augments = (augmentation, augment.build_augmentation(
            config.second_view_size, shape[-1], crop_scale=crop_scale,
            seed=config.seed + augment.SEEDS_PER_AUGMENTATION))
    return augmentation, pipelines.distribute_pretraining(
        strategy or tf.distribute.get_strategy(), train_set, config.batch_size,
        views=config.views, augment=augments, seed=config.seed,
        with_labels=config.online_probe, epochs=config.epochs,
        initial_epoch=initial_epoch, steps_per_epoch=config.epoch_steps(len(train_set)))


def make_deterministic():
    """Turns on TensorFlow's op determinism, for the rest of the process.

    tf.data then runs the augmentation map one batch at a time, so the
    augmentation layers' seed generators are read in batch order. oneDNN's CPU
    kernels can still differ in the last bit now and then (1 run in 7 here);
    TF_ENABLE_ONEDNN_OPTS=0, read when TensorFlow is imported, turns them off.
    """
    tf.config.experimental.enable_op_determinism()
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0":
        logger.warning("--deterministic: set TF_ENABLE_ONEDNN_OPTS=0 before the run "
                       "for bit-identical results on x86 CPUs (oneDNN's kernels)")
