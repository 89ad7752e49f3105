"""A whole SimCLIC job: pretrain, evaluate (kNN, linear and, with
--finetune-epochs, fine-tuned, against the same encoder at random
initialisation), export and report, in one run directory:

    run_dir/config.json     the knobs, read back by --resume
    run_dir/data.json       the data's sizes, which --resume checks
    run_dir/logs/train/     TensorBoard: per-epoch scalars, augmented views, and
                            the run's HParams session
    run_dir/backup/         the last epoch's checkpoint until the report is written
    run_dir/history.csv     per-epoch loss, z_std, z_rank, mix, knn_accuracy
    run_dir/model.keras     the full SimCLIC model (history buffer included)
    run_dir/encoder.keras   the backbone alone, for downstream use
    run_dir/report.json, report.md
    run_dir/*.png           training curves, augmented views, embedding map
"""

import dataclasses
import os
import shutil
import time

import keras

from simclic_tf import distribute, outputs, rundir, sources
from simclic_tf.callbacks import ResumableCSVLogger, SignalStop
from simclic_tf.evaluation import evaluate_backbone, labelled_memory, online_probe_accuracy
from simclic_tf.faults import Diverged, StopOnSignal
from simclic_tf.report import data_summary, describe_data, write_report
from simclic_tf.training import build_pretraining


def run(config, resume=False, given=None):
    """Runs the job and returns the report dict (also written to run_dir, or
    on a multi-worker cluster's non-chief tasks to its worker subdirectory).

    The run directory is checked and locked before the data are loaded, and
    every check that can refuse the run passes before anything is written.
    SIGINT and SIGTERM stop it at the end of a step (`faults.Interrupted`); a
    non-finite loss or weight stops it before the weights are saved
    (`faults.Diverged`); both keep the last epoch's checkpoint for `--resume`,
    which `given` (the knobs set on the command line) must not contradict.
    """
    subdir = distribute.worker_subdir()
    if subdir:
        config = config.replace(run_dir=os.path.join(config.run_dir, subdir))
    with StopOnSignal() as stop, rundir.RunDirectory(config.run_dir) as run_dir:
        config = rundir.training_config(run_dir, config, resume, given or {})
        strategy = distribute.make_strategy(config.strategy)  # Before other TF work.
        keras.utils.set_random_seed(config.seed)
        train_set, test_set = sources.load_train_and_eval(config)
        summary = data_summary(train_set, test_set)
        if resume:
            rundir.check_same_data(run_dir, summary)
        memory, queries = labelled_memory(train_set, test_set, config.seed,
                                          config.knn_bank_size)
        pretraining = build_pretraining(config, train_set, strategy,
                                         rundir.resumed_epoch(run_dir) if resume else 0,
                                         memory, queries,
                                         spent_seconds(run_dir) if resume else 0.0)
        config, model = pretraining.config, pretraining.model
        summary.update(storage=train_set.storage, knn_memory_images=len(memory),
                       knn_classes=memory.num_classes)
        print(describe_data(train_set, test_set, memory))

        rundir.start_training(run_dir, config, pretraining.derived, summary,
                              pretraining.total_steps)
        stop.run_dir = config.run_dir
        report = {"config": config.to_dict(), "data": summary,
                  "random_init": evaluate_backbone(model.backbone, memory, queries, config),
                  "steps": pretraining.total_steps, "derived": pretraining.derived,
                  "precision_pick": pretraining.precision_pick}
        outputs.draw_views(train_set, pretraining.augmentation, config.run_dir)
        start = time.time()
        try:
            pretraining.fit(job_callbacks(config, stop, resume))
        except Diverged as error:
            report["diverged"] = {"epoch": error.epoch, "step": error.step, "what": error.what}
            outputs.log_results(report, config.run_dir)
            write_report(report, config.run_dir)
            raise
        finally:
            stop.training = False  # a signal from here on stops at once
        report["train_seconds"] = time.time() - start
        if config.time_budget:  # the length the run's pace fitted, and what follows from it
            report.update(config=model.config.to_dict(), steps=pretraining.total_steps,
                          derived=pretraining.derived, budget=budget_report(pretraining))

        outputs.export(model, config.run_dir)
        rows = outputs.history_rows(run_dir.file("history.csv"))
        report.update(evaluate_pretrained(pretraining, rows, memory, queries, test_set))
        report["pictures"] = outputs.draw_results(model, queries, rows, report, config.run_dir)
        outputs.log_results(report, config.run_dir)  # before the report: a resume redoes both
        write_report(report, config.run_dir)
        shutil.rmtree(run_dir.file("backup"), ignore_errors=True)
        return report


def spent_seconds(run_dir):
    """The pretraining seconds a stopped run spent up to its last logged
    epoch (0 when none was logged): what `--time-budget` has used."""
    path = run_dir.file("history.csv")
    rows = outputs.history_rows(path) if os.path.exists(path) else []
    return rows[-1].get("seconds", 0.0) if rows else 0.0


def budget_report(pretraining):
    """The report's `budget`: what a budgeted run measured and chose (its
    `BudgetPlan`; on resume, the budget alone), the pretraining seconds it
    spent, and the step at which the budget ran out (None: it did not)."""
    clock = pretraining.clock
    plan = dataclasses.asdict(pretraining.budget) if pretraining.budget else {}
    return {**plan, "budget_seconds": clock.budget_seconds, "seconds": clock.seconds,
            "ran_out_at_step": clock.ran_out}


def job_callbacks(config, stop, resume):
    """What the job adds to the library's observers: the signal stop (before
    the backup saves an epoch it rejects), the backup, and the logs."""
    return [
        SignalStop(stop, config.run_dir),
        # Kept until the report is written (run deletes it), so that a run
        # stopped while evaluating resumes there rather than training again.
        keras.callbacks.BackupAndRestore(os.path.join(config.run_dir, "backup"),
                                         double_checkpoint=True, delete_checkpoint=False),
        ResumableCSVLogger(os.path.join(config.run_dir, "history.csv"), append=resume),
        keras.callbacks.TensorBoard(os.path.join(config.run_dir, "logs")),
    ]


def evaluate_pretrained(pretraining, rows, memory, queries, test_set):
    """The report's entries after pretraining: the pretrained encoder's
    errors, the last epoch's metrics (history `rows`), where it collapsed,
    the online probe's accuracy."""
    config, model = pretraining.config, pretraining.model
    collapse = pretraining.collapse_monitor
    results = {
        "pretrained": evaluate_backbone(model.backbone, memory, queries, config),
        "final_loss": rows[-1]["loss"],
        "final_z_std": rows[-1]["z_std"],
        "final_z_rank": rows[-1]["z_rank"],
        "collapsed_at_epoch": next((int(row["epoch"]) + 1 for row in rows
                                    if collapse.is_collapsed(row)), None),
    }
    if model.probe is not None:
        results["online_probe_accuracy"] = online_probe_accuracy(model, test_set,
                                                                 test_set.labels)
    return results
