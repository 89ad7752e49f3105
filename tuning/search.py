"""Ablation searches with keras-tuner: the paper's Tables 4 to 6 (predictor,
stop-gradient, loss), the perturbation type, and the perturbation strength.

    simclic tune --ablation predictor --dataset digits --epochs 20
    simclic tune --ablation strength --perturbation noise --max-trials 12

Every `simclic train` flag sets the fixed knobs (`--config FILE` too). Discrete
ablations walk their whole grid (`--max-trials` caps it); `strength` (with
`history_momentum` for history) runs Bayesian optimisation. Each trial
pretrains from the same seed on the training data less a held-out labelled
`--val-fraction`, and is scored by kNN (or `--objective linear`) accuracy on
that split after its last epoch.

The run directory (`--run-dir`, default runs/ablation_NAME) holds:

    search.json          the search's settings; a rerun must match them
    tuner/               keras-tuner's state: one trial_*/ per trial
    logs/                TensorBoard: the HParams experiment, and one
                         trial_ID/ per trial (train/, validation/)
    results.md, .csv     the table in the paper's form; trials.csv, all trials
    best_config.json     the best trial's config: simclic train --config FILE

Interrupted (Ctrl-C, a crash, a lost machine), the same command resumes:
finished trials are kept, the trial that was running restarts from its last
finished epoch. Rerunning with a larger `--max-trials` extends the search.
"""

import dataclasses
import os
import shutil
from typing import Optional, Tuple

import keras
import keras_tuner

from simclic_tf import compat, distribute, sources
from simclic_tf.callbacks import CollapseMonitor
from simclic_tf.cli import (add_config_flags, add_knob_flags, base_config, config_flags_given,
                            flags_given, knobs_given)
from simclic_tf.config import ConfigError, SimCLICConfig
from simclic_tf.faults import atomic_path
from simclic_tf.knobs import Knobs, knob
from simclic_tf.rundir import RunDirectory, refuse_contradictions, resumed_epoch
from simclic_tf.tuning import table
from simclic_tf.tuning.hypermodel import (ABLATIONS, EXTRA_KNOBS, OBJECTIVES,
                                          SimCLICHyperModel, ablation_fields, grid,
                                          is_discrete, objective_name, search_space,
                                          trial_config, validation_split)

DEFAULT_BAYESIAN_TRIALS = 10


class GridOracle(keras_tuner.Oracle):
    """Walks every combination of a discrete space once, in `grid` order.

    keras-tuner 1.4.8's GridSearchOracle keeps its walk in memory only, so a
    reloaded search fails or stops early (keras-team/keras-tuner#1055). This
    one keeps no state beyond the trials: the next trial is the first
    combination no trial has taken.
    """

    def populate_space(self, trial_id):
        taken = [t.hyperparameters.values for t in compat.started_trials(self)]
        for values in grid(self.get_space()):
            if values not in taken:
                return {"status": keras_tuner.engine.trial.TrialStatus.RUNNING,
                        "values": values}
        if compat.has_running_trials(self):
            return {"status": keras_tuner.engine.trial.TrialStatus.IDLE, "values": None}
        return {"status": keras_tuner.engine.trial.TrialStatus.STOPPED, "values": None}


class BayesianOracle(keras_tuner.oracles.BayesianOptimizationOracle):
    """Bayesian optimisation whose first trial is the configured values (the
    perturbation's default strength unless --strength is given): the search
    always reports the reference point beside what it explores."""

    def populate_space(self, trial_id):
        if not compat.started_trials(self):
            return {"status": keras_tuner.engine.trial.TrialStatus.RUNNING,
                    "values": {p.name: p.default for p in self.get_space().space}}
        return super().populate_space(trial_id)


class AblationTuner(keras_tuner.Tuner):
    """Runs a trial with the callbacks of a run directory: TensorBoard and the
    HParams session in logs/trial_ID, and BackupAndRestore so that an
    interrupted trial resumes at its last finished epoch. A failing trial
    stops the search (left as running, it is retried on the next run) instead
    of being skipped as keras-tuner does by default."""

    def __init__(self, oracle, hypermodel, run_dir):
        self.logs_dir = os.path.join(run_dir, "logs")
        super().__init__(oracle, hypermodel, directory=run_dir, project_name="tuner",
                         overwrite=False)

    def trial_log_dir(self, trial_id):
        return os.path.join(self.logs_dir, f"trial_{trial_id}")

    def run_trial(self, trial, *args, **kwargs):
        from tensorboard.plugins.hparams import api as hparams_api

        hp = trial.hyperparameters
        log_dir = self.trial_log_dir(trial.trial_id)
        callbacks = [
            keras.callbacks.BackupAndRestore(
                os.path.join(self.get_trial_dir(trial.trial_id), "backup")),
            keras.callbacks.TensorBoard(log_dir),
            hparams_api.KerasCallback(log_dir, dict(hp.values), trial_id=trial.trial_id),
        ]
        try:
            keras.backend.clear_session()
            # An interrupted trial's data resume at its backup's epoch too.
            self.hypermodel.initial_epoch = resumed_epoch(
                RunDirectory(self.get_trial_dir(trial.trial_id)))
            model = self.hypermodel.build(hp)
            return self.hypermodel.fit(hp, model, callbacks=callbacks)
        except Exception as error:
            raise keras_tuner.errors.FatalError(
                f"trial {trial.trial_id} ({hp.values}) failed: {type(error).__name__}: "
                f"{error}; it is kept as running and retried when the search is rerun"
            ) from error


def write_hparams_experiment(logs_dir, hp, objective):
    """The HParams dashboard's experiment: the searched knobs with their
    domains and the metrics, in `logs_dir` (once)."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hparams_api

    if os.path.isdir(logs_dir) and any(name.startswith("events.out.tfevents")
                                       for name in os.listdir(logs_dir)):
        return
    hparams = []
    for parameter in hp.space:
        if isinstance(parameter, keras_tuner.engine.hyperparameters.Boolean):
            domain = hparams_api.Discrete([False, True])
        elif isinstance(parameter, keras_tuner.engine.hyperparameters.Choice):
            domain = hparams_api.Discrete(list(parameter.values))
        elif isinstance(parameter, keras_tuner.engine.hyperparameters.Int):
            domain = hparams_api.IntInterval(parameter.min_value, parameter.max_value)
        else:
            domain = hparams_api.RealInterval(float(parameter.min_value),
                                              float(parameter.max_value))
        hparams.append(hparams_api.HParam(parameter.name, domain))
    kinds = {"knn": "kNN", "linear": "linear"}
    metrics = [hparams_api.Metric(f"epoch_{kind}_accuracy", group="validation",
                                  display_name=f"validation {label} accuracy")
               for kind, label in kinds.items() if kind == "knn" or objective == "linear"]
    metrics += [hparams_api.Metric("epoch_z_std", group="train", display_name="z_std"),
                hparams_api.Metric("epoch_loss", group="train", display_name="loss")]
    os.makedirs(logs_dir, exist_ok=True)
    with tf.summary.create_file_writer(logs_dir).as_default():
        hparams_api.hparams_config(hparams=hparams, metrics=metrics)


@dataclasses.dataclass(frozen=True)
class Search(Knobs):
    """What a search needs besides the tuner: the config its trials start
    from, and its settings, the knobs behind `simclic tune`'s own flags."""
    config: SimCLICConfig
    ablation: Optional[str] = knob(
        None, "what to vary: the paper's Table 4 (predictor), 5 (stop_gradient), 6 (loss), "
        "the perturbation type, or the strength of --perturbation (history: and "
        "history_momentum); needed to start a search, not to resume one", choices=ABLATIONS)
    tune: Tuple[str, ...] = knob(
        (), "also search these, a decade either side of their flag's value (log scale; the "
        "search becomes Bayesian)", choices=EXTRA_KNOBS)
    objective: str = knob("knn", "validation accuracy to maximise", choices=OBJECTIVES)
    val_fraction: float = knob(
        0.1, "labelled fraction of the training data held out to score trials",
        range=(0.01, 0.9))
    max_trials: Optional[int] = knob(
        None, "trials at most (default: the whole grid; strength: "
        f"{DEFAULT_BAYESIAN_TRIALS}); a rerun with more extends the search", range=(1, 100000))

    @property
    def run_dir(self):
        return self.config.run_dir

    @property
    def fields(self):
        return ablation_fields(self.ablation, self.config) + tuple(self.tune)

    def settings(self):
        return {"ablation": self.ablation, "tune": list(self.tune), "objective": self.objective,
                "val_fraction": self.val_fraction, "config": self.config.to_dict()}


def check_grid(search, hp):
    """Fails early, naming the flags, when a grid point is not a valid config."""
    points = grid(hp) if is_discrete(hp) else [{}]
    for values in points:
        trial_hp = keras_tuner.HyperParameters()
        trial_hp.values = dict(values)
        try:
            trial_config(search.config, search.fields, trial_hp)
        except ConfigError as error:
            raise ConfigError(f"--ablation {search.ablation} with {values}: {error}") from None


def build_tuner(search, train_set, validation, strategy=None, verbose=2):
    hypermodel = SimCLICHyperModel(search.config, search.fields, train_set, validation,
                                   search.objective, strategy, verbose=verbose)
    hp = search_space(search.config, search.fields)
    check_grid(search, hp)
    objective = keras_tuner.Objective(objective_name(search.objective), "max")
    if is_discrete(hp):
        oracle = GridOracle(objective=objective, max_trials=search.max_trials or len(grid(hp)),
                            seed=search.config.seed + 1)
    else:
        oracle = BayesianOracle(
            objective=objective, max_trials=search.max_trials or DEFAULT_BAYESIAN_TRIALS,
            seed=search.config.seed + 1)
    write_hparams_experiment(os.path.join(search.run_dir, "logs"), hp, search.objective)
    return AblationTuner(oracle, hypermodel, search.run_dir), hp


def write_outputs(search, tuner, hp):
    """results.md/.csv, trials.csv and best_config.json; returns the markdown."""
    records = table.trial_records(tuner.oracle)
    config = search.config
    collapse = CollapseMonitor(config.proj_dim)
    fields = [p.name for p in hp.space]
    kind = "kNN" if search.objective == "knn" else "linear"
    notes = [
        f"{config.dataset}, {config.backbone} width {config.width}, {config.epochs} epochs, "
        f"batch {config.batch_size}, base lr {config.base_lr:g}"
        + ("" if search.ablation == "perturbation" else f", perturbation {config.perturbation}")
        + (f" (strength {config.strength:g})" if config.strength is not None
           and search.ablation not in ("perturbation", "strength") else ""),
        f"error % on a {100 * search.val_fraction:g} % validation split held out from the "
        f"training data (seed {config.seed}); objective: {kind} accuracy (max); "
        f"collapsed: final {collapse.describe()} (healthy z_std about "
        f"1/sqrt({config.proj_dim}) = {config.proj_dim ** -0.5:.4f})",
    ]
    done = len(table.completed(records))
    if search.ablation != "strength":
        variants = list(next(p for p in hp.space if p.name == search.ablation).values)
        title, header, rows = table.discrete_table(
            search.ablation, variants, records, search.objective, collapse,
            extra=[f for f in fields if f != search.ablation])
        notes.append(f"{done} of {len(grid(hp))} grid points completed" if is_discrete(hp)
                     else f"{done} trials completed")
        by_column = True
    else:
        title, header, rows = table.continuous_table(
            f"Effect of the {config.perturbation} perturbation's strength", fields, records,
            collapse)
        notes.append(f"{done} trials completed")
        by_column = False
    best = table.best_record(records, search.objective)
    if best is not None:
        best_config = config.replace(**trial_config_values(search, best["values"]),
                                     run_dir=os.path.join(search.run_dir, "best"))
        with atomic_path(os.path.join(search.run_dir, "best_config.json")) as partial:
            best_config.save(partial)
        notes.append(f"best: trial {best['trial_id']} {best['values']} -> best_config.json "
                     "(python train.py --config FILE)")
    table.write_trials_csv(os.path.join(search.run_dir, "trials.csv"), fields, records)
    return table.write_results(search.run_dir, title, header, rows, notes, by_column)


def trial_config_values(search, values):
    hp = keras_tuner.HyperParameters()
    hp.values = dict(values)
    config = trial_config(search.config, search.fields, hp)
    return {name: getattr(config, name) for name in search.fields + ("strength",)}


def load_data(search):
    """(pretraining set, validation split): train.py's training set (its
    evaluation set is never used) less a stratified `val_fraction`."""
    train_set, _ = sources.load_train_and_eval(search.config)
    return validation_split(train_set, search.val_fraction, search.config.seed)


def run_search(search, run_dir, verbose=2):
    """Runs (or resumes) the search in the locked `run_dir` under its
    config's `--strategy`; returns the results markdown."""
    strategy = distribute.make_strategy(search.config.strategy)  # Before other TF work.
    train_set, validation = load_data(search)
    tuner, hp = build_tuner(search, train_set, validation, strategy, verbose)
    run_dir.write_json("search.json", search.settings())
    tuner.search()
    return write_outputs(search, tuner, hp)


SUMMARY = "keras-tuner ablations (the paper's Tables 4 to 6) and strength searches"


def add_arguments(parser):
    tuning = add_knob_flags(parser.add_argument_group("search"), Search)
    tuning.add_argument("--overwrite", action="store_true",
                        help="discard the search in --run-dir and start over")
    tuning.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    add_config_flags(parser)


# What a search leaves in its run directory: --overwrite removes these.
SEARCH_OUTPUTS = ("tuner", "logs", "search.json", "results.md", "results.csv", "trials.csv",
                  "best_config.json")


def search_from_args(args, run_dir):
    """The Search a command line asks for in the locked `run_dir`. A run
    directory that holds a search resumes it: its saved settings are the
    defaults, and a flag that contradicts them is an error (the comparison
    `simclic train --resume` makes)."""
    saved = run_dir.read_json("search.json")
    if saved is not None and args.overwrite:
        for name in SEARCH_OUTPUTS:
            shutil.rmtree(run_dir.file(name), ignore_errors=True)
            if os.path.isfile(run_dir.file(name)):
                os.remove(run_dir.file(name))
        saved = None
    # Flags over the saved search's config (or over --config / --recipe).
    base = (SimCLICConfig.from_dict(saved["config"])
            if saved is not None and not (args.config or args.recipe) else base_config(args))
    requested = base.replace(**{**config_flags_given(args), "run_dir": run_dir.path})
    settings = {name: value for name, value in flags_given(args, Search).items()
                if name != "max_trials"}
    if saved is None:
        if args.ablation is None:
            raise ConfigError(f"--run-dir {run_dir.path} holds no search to resume; "
                              "--ablation is needed to start one")
        return Search(requested, **flags_given(args, Search))
    given = {name: value for name, value in knobs_given(args, requested).items()
             if name != "run_dir"}
    refuse_contradictions({**saved["config"], **saved}, {**given, **settings}, run_dir.path,
                          what="search", remedy="pass --overwrite to start it over")
    # The run directory may have moved, or be spelled another way: it is where it is.
    return Search(SimCLICConfig.from_dict(saved["config"]).replace(run_dir=run_dir.path),
                  saved["ablation"], tuple(saved["tune"]), saved["objective"],
                  saved["val_fraction"], args.max_trials)


def search_dir(args):
    """The run directory a command line names: --run-dir, else the ablation's."""
    if args.run_dir is None and args.ablation is None:
        raise ConfigError("--ablation is needed (or --run-dir of a search to resume)")
    return args.run_dir or f"runs/ablation_{args.ablation}"


def command(args, parser):
    """`simclic tune`: runs (or resumes) the search, prints its table."""
    try:
        with RunDirectory(search_dir(args)) as run_dir:
            search = search_from_args(args, run_dir)
            text = run_search(search, run_dir, verbose=0 if args.quiet else 2)
    except (ConfigError, sources.DataError) as error:
        parser.error(str(error))
    print(text)
    return 0
