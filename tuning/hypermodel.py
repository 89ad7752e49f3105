"""The keras-tuner side of SimCLIC: a search space derived from SimCLICConfig,
a HyperModel that trains one trial, and the validation objective.

The search space is not restated here: a tuned knob's values come from its
config field (`choices`, a registry's names, `range`, or its bool type), and
the perturbation strength's interval from the perturbation class
(`strength_range`). The objective is the kNN (or linear) accuracy on a
labelled split held out from the *training* data, never the SSL loss, which
a collapsed encoder minimises best.
"""

import dataclasses

import keras
import keras_tuner

from simclic_tf.config import ConfigError, SimCLICConfig, choice_names, flag, value_type
from simclic_tf.evaluation import evaluate_backbone, labelled_memory
from simclic_tf.registry import PERTURBATIONS
from simclic_tf.sources import DataError
from simclic_tf.faults import Diverged
from simclic_tf.training import build_pretraining

FIELDS = {field.name: field for field in dataclasses.fields(SimCLICConfig)}

# The paper's Tables 4 to 6, the perturbation type, its strength, and the
# branch it applies to (docs/DESIGN.md leaves that to this ablation).
ABLATIONS = ("predictor", "stop_gradient", "loss", "perturbation", "strength", "perturb")

# Knobs that may be tuned alongside an ablation (`--tune`): searched on a log
# scale over a decade either side of the configured value (clipped to the
# field's range), since their fields' ranges bound validity, not sense.
EXTRA_KNOBS = ("base_lr", "weight_decay")

OBJECTIVES = ("knn", "linear")


def objective_name(kind):
    """The epoch-log key the tuner maximises: `val_knn_accuracy` or `val_linear_accuracy`."""
    return f"val_{kind}_accuracy"


def ablation_fields(ablation, config):
    """The config fields an ablation varies."""
    if ablation not in ABLATIONS:
        raise ConfigError(f"--ablation {ablation!r} is not accepted; choose one of: "
                          f"{', '.join(ABLATIONS)}")
    if ablation == "perturb" and config.perturbation == "none":
        raise ConfigError(
            "--ablation perturb: with --perturbation none both branches see the same z, so "
            "target and online are one run; choose one of: "
            f"{', '.join(name for name in PERTURBATIONS.names() if name != 'none')}")
    if ablation != "strength":
        return (ablation,)
    if PERTURBATIONS.get(config.perturbation).strength_range is None:
        with_strength = [name for name in PERTURBATIONS.names()
                         if PERTURBATIONS.get(name).strength_range is not None]
        raise ConfigError(
            f"--ablation strength: --perturbation {config.perturbation} has no strength to "
            f"search; choose one of: {', '.join(with_strength)}")
    if config.perturbation.startswith("history"):
        return ("strength", "history_momentum")
    return ("strength",)


def declare(hp, name, config):
    """Declares config field `name` in `hp` (keras_tuner.HyperParameters),
    its domain read from the field's metadata, with `config`'s value as the
    default, and returns the value of the current trial."""
    if name not in FIELDS:
        raise ConfigError(f"{name!r} is not a SimCLICConfig field")
    field = FIELDS[name]
    current = getattr(config, name)
    if name == "strength":
        perturbation = PERTURBATIONS.get(config.perturbation)
        low, high = perturbation.strength_range
        default = perturbation.default_strength if current is None else current
        return hp.Float(name, low, high, default=default)
    if name in EXTRA_KNOBS:
        low, high = field.metadata["range"]
        if not current > 0:
            raise ConfigError(f"--tune {name} searches a decade around {flag(name)}, "
                              f"which is {current}; give it a value above 0")
        return hp.Float(name, max(low, current / 10), min(high, current * 10),
                        sampling="log", default=current)
    kind = value_type(field)
    if kind is bool:
        return hp.Boolean(name, default=current)
    if field.metadata["choices"] is not None:
        return hp.Choice(name, list(choice_names(field.metadata["choices"])), default=current)
    if field.metadata["range"] is not None:
        low, high = field.metadata["range"]
        if kind is int:
            return hp.Int(name, low, high, default=current)
        return hp.Float(name, low, high, default=current)
    raise ConfigError(f"{flag(name)} has neither choices nor a range: it cannot be searched")


def trial_config(base, fields, hp):
    """The config of one trial: `base` with the tuned `fields` set from `hp`."""
    values = {name: declare(hp, name, base) for name in fields}
    if "perturbation" in values:
        # Each perturbation at its own default strength ('none' has none).
        values["strength"] = None
    return base.replace(**values)


def search_space(base, fields):
    """The keras_tuner.HyperParameters of the fields, declared as a trial would."""
    hp = keras_tuner.HyperParameters()
    trial_config(base, fields, hp)
    return hp


def is_discrete(hp):
    """True when every hyperparameter has a finite list of values (a grid)."""
    return all(isinstance(p, (keras_tuner.engine.hyperparameters.Choice,
                              keras_tuner.engine.hyperparameters.Boolean)) for p in hp.space)


def grid(hp):
    """Every combination of a discrete space, each value list starting with its
    default, the first hyperparameter varying slowest."""
    axes = []
    for parameter in hp.space:
        values = list(parameter.values)
        values.remove(parameter.default)
        axes.append([(parameter.name, value) for value in [parameter.default] + values])
    combinations = [{}]
    for axis in axes:
        combinations = [{**c, name: value} for c in combinations for name, value in axis]
    return combinations


def validation_split(train_set, fraction, seed):
    """(rest, validation): a stratified, seeded `fraction` of the labelled
    training set, rows kept in order. The tuner pretrains on `rest` and scores
    a trial on `validation`, so the test set never steers a choice."""
    if train_set.labels is None:
        raise DataError(
            "--dataset has no labels, so no labelled validation split can be held out of "
            "it for the tuner's objective; pass a labelled training set (dir:PATH with one "
            "folder per class, npz:PATH with y, or a labelled tensorflow-datasets name)")
    try:
        return train_set.stratified_split(fraction, seed)
    except ValueError as error:
        raise DataError(
            f"--val-fraction {fraction} cannot hold out a stratified split of the "
            f"{len(train_set)} training images ({train_set.num_classes} classes): {error}"
        ) from None


class ValidationMonitor(keras.callbacks.Callback):
    """The tuner's objective: the backbone's accuracy on the held-out
    validation split (`evaluate_backbone`, memory: the pretraining images and
    their labels), logged with a `val_` prefix: kNN after the last epoch and
    every `config.knn_every` epochs (0: last only), and with `linear` a linear
    classifier's after the last epoch. `final` holds the last epoch's logs
    (with the objective computed at the end when training stopped early, on
    collapse with --stop-on-collapse, or resumed after its last epoch). Put it
    before `keras.callbacks.TensorBoard` so the values reach TensorBoard."""

    def __init__(self, memory, validation, config, linear=False):
        super().__init__()
        self.memory = memory
        self.validation = validation
        self.config = config.replace(finetune_epochs=0)
        self.linear = linear
        self.final = None
        self.last_logs = {}

    def evaluate(self, linear):
        config = self.config.replace(linear_epochs=self.config.linear_epochs if linear else 0)
        results = evaluate_backbone(self.model.backbone, self.memory, self.validation, config)
        return {f"val_{name}": value for name, value in results.items()}

    def on_epoch_end(self, epoch, logs=None):
        logs = {} if logs is None else logs
        last = epoch + 1 == self.params["epochs"]
        every = self.config.knn_every
        if last or (every and (epoch + 1) % every == 0):
            logs.update(self.evaluate(linear=last and self.linear))
        self.last_logs = {key: float(value) for key, value in logs.items()}
        if last:
            self.final = self.last_logs

    def on_train_end(self, logs=None):
        if self.final is None:
            self.final = {**self.last_logs, **self.evaluate(linear=self.linear)}


class SimCLICHyperModel(keras_tuner.HyperModel):
    """Builds and trains one trial: `base` with the tuned `fields` from `hp`.

    Args:
      base: the SimCLICConfig of the fixed knobs (the train.py flags).
      fields: names of the config fields searched.
      train_set: labelled ImageSet to pretrain on (the validation split removed).
      validation: labelled ImageSet that scores a trial.
      objective: "knn" or "linear".
      strategy: the tf.distribute strategy trials train under (default: the
        current one).
    """

    def __init__(self, base, fields, train_set, validation, objective="knn", strategy=None,
                 verbose=2):
        super().__init__(name="simclic")
        if objective not in OBJECTIVES:
            raise ConfigError(f"--objective {objective!r} is not accepted; choose one of: "
                              f"{', '.join(OBJECTIVES)}")
        if objective == "linear" and not base.linear_epochs:
            raise ConfigError("--objective linear needs --linear-epochs above 0")
        self.base = base
        self.fields = tuple(fields)
        self.train_set = train_set
        self.validation = validation
        self.objective = objective
        self.strategy = strategy
        self.verbose = verbose
        self.initial_epoch = 0  # the tuner sets it when a trial resumes

    def config(self, hp):
        return trial_config(self.base, self.fields, hp)

    def build(self, hp):
        """The trial's model, built with its input by `build_pretraining`
        (so every knob acts as in `simclic train`), from the same seed."""
        config = self.config(hp)
        keras.utils.set_random_seed(config.seed)  # every trial starts from the same draw
        self.pretraining = build_pretraining(config, self.train_set, self.strategy,
                                             self.initial_epoch)
        return self.pretraining.model

    def fit(self, hp, model, callbacks=(), **kwargs):
        """Pretrains `model` (from the last `build`) and returns the last
        epoch's metrics: the objective, `z_std`, `z_rank`, `loss` (and the
        other one of kNN / linear when computed). A trial that diverges scores
        0 and says so (`diverged` 1) rather than ending the search."""
        pretraining = self.pretraining
        if model is not pretraining.model:
            raise ValueError("SimCLICHyperModel.fit trains the model of its last build()")
        config = pretraining.config
        memory, _ = labelled_memory(self.train_set, self.validation, config.seed,
                                    config.knn_bank_size)
        monitor = ValidationMonitor(memory, self.validation, config,
                                    linear=self.objective == "linear")
        try:
            pretraining.fit([monitor, *callbacks], verbose=self.verbose)
        except Diverged:
            return {objective_name(self.objective): 0.0, "diverged": 1.0}
        return dict(monitor.final)
