"""A whole SimCLIC job: pretrain, evaluate (kNN, linear and, with
--finetune-epochs, fine-tuned, against the same encoder at random
initialisation), export and report, in one run directory:

    run_dir/config.json     the knobs, read back by --resume
    run_dir/data.json       the data's sizes, which --resume checks
    run_dir/logs/train/     TensorBoard: per-epoch scalars, augmented views, and
                            the run's HParams session (see log_results)
    run_dir/backup/         the last epoch's checkpoint until the report is written
    run_dir/history.csv     per-epoch loss, z_std, z_rank, knn_accuracy
    run_dir/model.keras     the full SimCLIC model (history buffer included)
    run_dir/encoder.keras   the backbone alone, for downstream use
    run_dir/report.json, report.md
    run_dir/*.png           training curves, augmented views, embedding map
"""

import csv
import json
import logging
import os
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api
from tensorboard.plugins.hparams import api_pb2, summary as hparams_summary

from simclic_tf import augment, data, distribute, plots
from simclic_tf.callbacks import (CollapseMonitor, DivergenceGuard, KNNMonitor,
                                  ResumableCSVLogger, SignalStop, StrengthRamp)
from simclic_tf.config import ConfigError, SimCLICConfig, flag
from simclic_tf.evaluation import (evaluate_backbone, extract_features, labelled_memory,
                                   online_probe_accuracy)
from simclic_tf.faults import Diverged, RunFinished, StopOnSignal, atomic_path
from simclic_tf.model import SimCLIC, build_optimizer
from simclic_tf.report import hparam_values, tensorboard_metrics, write_report

logger = logging.getLogger(__name__)


def check_run_dir(run_dir):
    """Refuses a --run-dir that cannot be a folder this process writes to,
    before anything is written."""
    if not run_dir:
        raise ConfigError("--run-dir is empty; give the path of a folder (created if missing)")
    path = Path(run_dir).absolute()
    try:
        existing = next(folder for folder in (path, *path.parents) if folder.exists())
    except OSError as error:  # a name too long, say
        raise ConfigError(f"--run-dir {run_dir} cannot be a folder: {error.strerror}") from None
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise ConfigError(f"--run-dir {run_dir} {where}; give the path of a folder "
                          "(created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--run-dir {run_dir} cannot be written: {existing} is not "
                          "writable by this user")


def prepare_run_dir(config, resume, given=None):
    """The config to run: on resume the one saved in the run directory.
    Refuses to overwrite a run that was not asked to resume, a resume whose
    `given` knobs ({name: value}, from the command line) contradict the saved
    run, and a resume of a run that has ended (`RunFinished`). Writes
    nothing: `save_config` does, once every check has passed."""
    check_run_dir(config.run_dir)
    config_path = os.path.join(config.run_dir, "config.json")
    if not resume:
        if os.path.exists(config_path):
            raise ConfigError(
                f"--run-dir {config.run_dir} already holds a run; pass --resume to "
                "continue it, or choose another --run-dir")
        return config
    if not os.path.exists(config_path):
        raise ConfigError(
            f"--resume: {config_path} does not exist; --run-dir must name the "
            "directory of the run to continue")
    report_path = os.path.join(config.run_dir, "report.json")
    if os.path.exists(report_path):
        with open(report_path) as f:
            raise RunFinished(config.run_dir, json.load(f).get("diverged"))
    saved = SimCLICConfig.load(config_path, source="--resume").replace(run_dir=config.run_dir)
    differing = [f"{flag(name)} {value} (saved: {getattr(saved, name)})"
                 for name, value in sorted((given or {}).items())
                 if name != "run_dir" and getattr(saved, name) != value]
    if differing:
        raise ConfigError(
            f"--resume continues the run saved in {config_path}, and these flags "
            f"contradict it: {'; '.join(differing)}. Drop them to continue it as saved, "
            "or start a new --run-dir")
    return saved


def data_summary(train_set, test_set):
    """What a run's history buffer and evaluation depend on in its data."""
    return {"train_images": len(train_set), "test_images": len(test_set),
            "image_shape": list(train_set.image_shape),
            "num_classes": train_set.num_classes}


def describe_data(train_set, test_set, memory):
    """One line: the sets, where their pixels are read from, the kNN memory."""
    def described(images):
        return (f"{len(images)} images {'x'.join(map(str, images.image_shape))} "
                f"({STORAGE_NAMES[images.storage]}, {byte_size(images.nbytes)} decoded)")

    return (f"Data: training {described(train_set)}; evaluation {described(test_set)}; "
            f"kNN memory {len(memory)} images")


def byte_size(count):
    """`count` bytes as a person reads them: 90 KiB, 5.2 GiB."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if count >= size:
            value = count / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{count} B"


STORAGE_NAMES = {"memory": "in memory", "files": "streamed from image files",
                 "memmap": "streamed from a memory-mapped .npz",
                 "stream": "streamed from tensorflow-datasets' files"}


def resumed_epoch(run_dir):
    """The epoch a resumed fit starts at: the one BackupAndRestore wrote in
    its backup's training_metadata.json (0 when there is none), read before
    fit so that the data can start there too."""
    path = os.path.join(run_dir, "backup", "training_metadata.json")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return int(json.load(f)["epoch"])


def check_same_data(run_dir, summary):
    """On resume: refuses data that differ from those the run started with
    (data.json), whose history buffer would not fit the checkpoint."""
    path = os.path.join(run_dir, "data.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    differing = [f"{key} {summary[key]} (saved: {saved[key]})" for key in sorted(summary)
                 if saved.get(key) != summary[key]]
    if differing:
        raise ConfigError(
            f"--resume: the data differ from those the run in {run_dir} started with: "
            f"{'; '.join(differing)}; restore them, or start a new --run-dir")


def save_config(config, derived, steps_per_epoch, summary):
    """Says which knobs were derived from the run's length, and writes
    config.json and data.json (the data's `summary`, checked on resume)."""
    for name, value in derived.items():
        logger.warning("%s %s, derived from the run's length (%d steps); give the flag "
                       "to override", flag(name), value, config.epochs * steps_per_epoch)
    try:
        os.makedirs(config.run_dir, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--run-dir {config.run_dir} cannot be created: "
                          f"{error.strerror}") from None
    with atomic_path(os.path.join(config.run_dir, "data.json")) as partial, \
            open(partial, "w") as f:
        json.dump(summary, f, indent=2)
    with atomic_path(os.path.join(config.run_dir, "config.json")) as partial:
        config.save(partial)


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
    augmentation seeded by `config.seed`, and labels in the batches when the
    online probe needs them."""
    shape = train_set.image_shape
    augmentation = augment.build_augmentation(shape[:2], shape[-1],
                                              crop_scale=(config.crop_min_scale, 1.0),
                                              seed=config.seed)
    return augmentation, data.distribute_pretraining(
        strategy or tf.distribute.get_strategy(), train_set, config.batch_size,
        views=config.views, augment=augmentation, seed=config.seed,
        with_labels=config.online_probe, epochs=config.epochs,
        initial_epoch=initial_epoch, steps_per_epoch=config.epoch_steps(len(train_set)))


def train_logs(run_dir):
    """The TensorBoard run that keras.callbacks.TensorBoard(run_dir/logs) writes
    its per-epoch scalars to, and that holds the run's other summaries."""
    return os.path.join(run_dir, "logs", "train")


def draw_views(train_set, augmentation, run_dir, count=8, seed=0):
    """Pairs of augmented views of `count` images drawn with `seed`, as
    views.png and a TensorBoard image."""
    chosen = np.random.default_rng(seed).choice(len(train_set), count, replace=False)
    grid = plots.view_pairs(train_set.subset(np.sort(chosen)).head(count), augmentation)
    plots.save_image(grid, os.path.join(run_dir, "views.png"))
    with tf.summary.create_file_writer(train_logs(run_dir)).as_default():
        tf.summary.image("augmented_views", grid[None], step=0)


def draw_results(model, queries, rows, report, run_dir):
    """The training curves of history `rows`, with the report's random-init
    references, and the embedding map; returns {title: file name}."""
    pictures = {"training curves": "curves.png", "augmented views (image, view 1, view 2)":
                "views.png", "embeddings of the evaluation images": "embeddings.png"}
    plots.training_curves(rows, os.path.join(run_dir, pictures["training curves"]),
                          report["config"]["proj_dim"], report["random_init"])
    plots.embedding_map(extract_features(model.backbone, queries), queries.labels,
                        queries.class_names, os.path.join(run_dir, "embeddings.png"))
    return pictures


def pretraining_callbacks(config, collapse, stop, memory, queries, resume):
    """model.fit's callbacks: the monitors first (their values reach the CSV
    and TensorBoard logs), then the stops (before the backup saves an epoch
    they reject), the backup, and the logs."""
    callbacks = [collapse]
    if config.strength_ramp:
        callbacks.append(StrengthRamp(config.epochs, config.strength_ramp))
    if config.knn_every:
        callbacks.append(KNNMonitor(memory, queries, config.knn_k, config.knn_t,
                                    config.knn_every))
    return callbacks + [
        DivergenceGuard(config),
        SignalStop(stop, config.run_dir),
        # Kept until the report is written (run deletes it), so that a run
        # stopped while evaluating resumes there rather than training again.
        keras.callbacks.BackupAndRestore(os.path.join(config.run_dir, "backup"),
                                         double_checkpoint=True, delete_checkpoint=False),
        ResumableCSVLogger(os.path.join(config.run_dir, "history.csv"), append=resume),
        keras.callbacks.TensorBoard(os.path.join(config.run_dir, "logs")),
    ]


def history_rows(history_csv):
    """The rows of history.csv, each {column: float} (NA columns left out):
    every epoch, also those trained before a resume."""
    with open(history_csv, newline="") as f:
        return [{key: float(value) for key, value in row.items() if value not in ("", "NA")}
                for row in csv.DictReader(f)]


def log_results(report, run_dir):
    """The run as one session of TensorBoard's HParams dashboard: the config
    (`hparam_values`) and the final errors (`tensorboard_metrics`, step 0),
    with a success or, diverged, failure status, in `train_logs` beside the
    per-epoch scalars, which the dashboard then counts as the session's
    metrics too. Not in run_dir/logs (the tuner's place, logs/trial_ID): with
    --logdir run_dir/logs that is TensorBoard's root run ".", to which the
    dashboard links no metrics."""
    writer = tf.summary.create_file_writer(train_logs(run_dir))
    with writer.as_default():
        hparams_api.hparams(hparam_values(report["config"]))
        for tag, value in tensorboard_metrics(report).items():
            tf.summary.scalar(tag, value, step=0)
        status = api_pb2.STATUS_FAILURE if "diverged" in report else api_pb2.STATUS_SUCCESS
        tf.summary.experimental.write_raw_pb(
            hparams_summary.session_end_pb(status).SerializeToString(), step=0)
    writer.close()


def export(model, run_dir):
    """model.keras and encoder.keras, each written whole or not at all."""
    for network, name in ((model, "model.keras"), (model.backbone, "encoder.keras")):
        with atomic_path(os.path.join(run_dir, name)) as partial:
            network.save(partial)


def run(config, resume=False, given=None):
    """Runs the job and returns the report dict (also written to run_dir, or
    on a multi-worker cluster's non-chief tasks to its worker subdirectory).

    Every check that can refuse the run (config, run directory, resume,
    data, model) passes before anything is written. SIGINT and SIGTERM stop
    it at the end of a step (`faults.Interrupted`); a non-finite loss or
    weight stops it before the weights are saved (`faults.Diverged`); both
    keep the last epoch's checkpoint for `--resume`, which `given` (the
    knobs set on the command line) must not contradict.
    """
    with StopOnSignal() as stop:
        subdir = distribute.worker_subdir()
        if subdir:
            config = config.replace(run_dir=os.path.join(config.run_dir, subdir))
        config = prepare_run_dir(config, resume, given)
        strategy = distribute.make_strategy(config.strategy)  # Before other TF work.
        keras.utils.set_random_seed(config.seed)
        train_set, test_set = data.load_train_and_eval(config)
        summary = data_summary(train_set, test_set)
        if resume:
            check_same_data(config.run_dir, summary)
        steps_per_epoch = config.epoch_steps(len(train_set))
        config, derived = config.for_budget(steps_per_epoch)
        initial_epoch = resumed_epoch(config.run_dir) if resume else 0
        augmentation, pretrain_data = pretrain_inputs(config, train_set, strategy,
                                                      initial_epoch)
        model = build_model(config, train_set, strategy)
        memory, queries = labelled_memory(train_set, test_set, config.seed,
                                          config.knn_bank_size)
        summary["storage"] = train_set.storage
        summary["knn_memory_images"] = len(memory)
        print(describe_data(train_set, test_set, memory))

        save_config(config, derived, steps_per_epoch, summary)
        stop.run_dir = config.run_dir
        random_init = evaluate_backbone(model.backbone, memory, queries, config)
        draw_views(train_set, augmentation, config.run_dir)
        report = {
            "config": config.to_dict(),
            "data": summary,
            "random_init": random_init,
            "steps": config.epochs * steps_per_epoch,
            "derived": derived,
        }
        collapse = CollapseMonitor(config.proj_dim, stop=config.stop_on_collapse)
        callbacks = pretraining_callbacks(config, collapse, stop, memory, queries, resume)
        start = time.time()
        try:
            model.fit(pretrain_data, epochs=config.epochs, initial_epoch=initial_epoch,
                      steps_per_epoch=steps_per_epoch, callbacks=callbacks, shuffle=False)
        except Diverged as error:
            report["diverged"] = {"epoch": error.epoch, "step": error.step, "what": error.what}
            log_results(report, config.run_dir)
            write_report(report, config.run_dir)
            raise
        finally:
            stop.training = False  # a signal from here on stops at once
        train_seconds = time.time() - start

        export(model, config.run_dir)
        rows = history_rows(os.path.join(config.run_dir, "history.csv"))
        final = rows[-1]
        report.update({
            "pretrained": evaluate_backbone(model.backbone, memory, queries, config),
            "final_loss": final["loss"],
            "final_z_std": final["z_std"],
            "final_z_rank": final["z_rank"],
            "collapsed_at_epoch": next((int(row["epoch"]) + 1 for row in rows
                                        if collapse.is_collapsed(row)), None),
            "train_seconds": train_seconds,
        })
        report["pictures"] = draw_results(model, queries, rows, report, config.run_dir)
        if model.probe is not None:
            report["online_probe_accuracy"] = online_probe_accuracy(
                model, test_set, test_set.labels)
        log_results(report, config.run_dir)  # before the report: a resume redoes both
        write_report(report, config.run_dir)
        shutil.rmtree(os.path.join(config.run_dir, "backup"), ignore_errors=True)
        return report
