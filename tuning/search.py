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
import json
import os

import keras
import keras_tuner

from simclic_tf import data
from simclic_tf.callbacks import CollapseMonitor
from simclic_tf.cli import add_config_flags, base_config
from simclic_tf.config import ConfigError, SimCLICConfig
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
        taken = [t.hyperparameters.values for t in self.trials.values()]
        for values in grid(self.get_space()):
            if values not in taken:
                return {"status": keras_tuner.engine.trial.TrialStatus.RUNNING,
                        "values": values}
        if self.ongoing_trials:
            return {"status": keras_tuner.engine.trial.TrialStatus.IDLE, "values": None}
        return {"status": keras_tuner.engine.trial.TrialStatus.STOPPED, "values": None}


class BayesianOracle(keras_tuner.oracles.BayesianOptimizationOracle):
    """Bayesian optimisation whose first trial is the configured values (the
    perturbation's default strength unless --strength is given): the search
    always reports the reference point beside what it explores."""

    def populate_space(self, trial_id):
        if not self.start_order:
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


@dataclasses.dataclass
class Search:
    """What a search needs besides the tuner: its settings and data."""
    config: SimCLICConfig
    ablation: str
    tune: tuple = ()
    objective: str = "knn"
    val_fraction: float = 0.1
    max_trials: int = None

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


def build_tuner(search, train_set, validation, verbose=2):
    hypermodel = SimCLICHyperModel(search.config, search.fields, train_set, validation,
                                   search.objective, verbose=verbose)
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
        best_config.save(os.path.join(search.run_dir, "best_config.json"))
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
    train_set, _ = data.load_train_and_eval(search.config)
    return validation_split(train_set, search.val_fraction, search.config.seed)


def run_search(search, verbose=2):
    """Runs (or resumes) the search; returns the results markdown."""
    train_set, validation = load_data(search)
    tuner, hp = build_tuner(search, train_set, validation, verbose)
    with open(os.path.join(search.run_dir, "search.json"), "w") as f:
        json.dump(search.settings(), f, indent=2, sort_keys=True)
    tuner.search()
    return write_outputs(search, tuner, hp)


SUMMARY = "keras-tuner ablations (the paper's Tables 4 to 6) and strength searches"


def add_arguments(parser):
    tuning = parser.add_argument_group("search")
    tuning.add_argument("--ablation", choices=ABLATIONS,
                        help="what to vary: the paper's Table 4 (predictor), 5 "
                        "(stop_gradient), 6 (loss), the perturbation type, or the strength "
                        "of --perturbation (history: and history_momentum)")
    tuning.add_argument("--max-trials", type=int,
                        help="trials at most (default: the whole grid; strength: "
                        f"{DEFAULT_BAYESIAN_TRIALS}); a rerun with more extends the search")
    tuning.add_argument("--objective", choices=OBJECTIVES,
                        help="validation accuracy to maximise (default: knn)")
    tuning.add_argument("--val-fraction", type=float,
                        help="labelled fraction of the training data held out to score "
                        "trials (default: 0.1)")
    tuning.add_argument("--tune", nargs="+", choices=EXTRA_KNOBS, default=None,
                        help="also search these, a decade either side of their flag's value "
                        "(log scale; the search becomes Bayesian)")
    tuning.add_argument("--overwrite", action="store_true",
                        help="discard the search in --run-dir and start over")
    tuning.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    add_config_flags(parser)


def search_from_args(args):
    """The Search a command line asks for. A run directory that holds a search
    resumes it: its saved settings are the defaults, and a flag that
    contradicts them is an error."""
    explicit = {f.name: getattr(args, f.name) for f in dataclasses.fields(SimCLICConfig)
                if getattr(args, f.name) is not None}
    saved = None
    if args.run_dir is not None or args.ablation is not None:
        run_dir = args.run_dir or f"runs/ablation_{args.ablation}"
        path = os.path.join(run_dir, "search.json")
        if os.path.exists(path) and args.overwrite:
            import shutil
            for name in ("tuner", "logs", "search.json", "results.md", "results.csv",
                         "trials.csv", "best_config.json"):
                target = os.path.join(run_dir, name)
                if os.path.isdir(target):
                    shutil.rmtree(target)
                elif os.path.exists(target):
                    os.remove(target)
        elif os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
    else:
        raise ConfigError("--ablation is needed (or --run-dir of a search to resume)")
    explicit["run_dir"] = run_dir
    if saved is None:
        if args.ablation is None:
            raise ConfigError(f"--run-dir {run_dir} holds no search to resume; "
                              "--ablation is needed to start one")
        base = base_config(args)
        return Search(base.replace(**explicit), args.ablation,
                      tuple(args.tune or ()), args.objective or "knn",
                      args.val_fraction if args.val_fraction is not None else 0.1,
                      args.max_trials)
    # The run directory may have moved, or be spelled another way: it is where it is.
    base = SimCLICConfig.from_dict(saved["config"]).replace(run_dir=run_dir)
    requested = (base_config(args) if args.config or args.recipe else base).replace(**explicit)
    changed = [f"--{name.replace('_', '-')} {getattr(base, name)} -> {getattr(requested, name)}"
               for name in base.to_dict() if getattr(base, name) != getattr(requested, name)]
    given = {"ablation": args.ablation, "tune": args.tune, "objective": args.objective,
             "val_fraction": args.val_fraction}
    changed += [f"--{name.replace('_', '-')} {saved[name]} -> {value}"
                for name, value in given.items()
                if value is not None and (list(value) if name == "tune" else value) != saved[name]]
    if changed:
        raise ConfigError(
            f"--run-dir {run_dir} holds a search with other settings ({'; '.join(changed)}); "
            "rerun with its settings to resume it, pass --overwrite to start over, or "
            "choose another --run-dir")
    return Search(base, saved["ablation"], tuple(saved["tune"]), saved["objective"],
                  saved["val_fraction"], args.max_trials)


def command(args, parser):
    """`simclic tune`: runs (or resumes) the search, prints its table."""
    try:
        search = search_from_args(args)
        text = run_search(search, verbose=0 if args.quiet else 2)
    except (ConfigError, data.DataError) as error:
        parser.error(str(error))
    print(text)
    return 0
