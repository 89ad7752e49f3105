"""The one frozen dataclass that holds every knob of a SimCLIC run.

The CLI flags (`cli.py`), the keras-tuner search space (`tuning/`) and the
saved `config.json` of a run are all derived from the fields below and their
metadata (`help`, `choices`, `range`; see knobs.py), so a knob is declared
exactly once.
"""

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Optional

# Also imported from here: ConfigError, flag and value_type (re-exported).
from simclic_tf.knobs import (ConfigError, Knobs, checked, choice_names,  # noqa: F401
                              flag, knob, value_type)
from simclic_tf.registry import BACKBONES, LOSSES, METHODS, PERTURBATIONS, PREDICTORS


def config_field(name):
    """SimCLICConfig's field `name`."""
    return next(f for f in dataclasses.fields(SimCLICConfig) if f.name == name)


def field_choices(name):
    """The accepted values of the config field `name`, for code that checks a
    value outside a config (the data pipelines' arguments)."""
    return choice_names(config_field(name).metadata["choices"])


def checked_value(name, value):
    """`value` checked as the config's knob `name` checks it (`knobs.checked`),
    for code given a knob's value outside a config: the same ConfigError."""
    return checked(config_field(name), value)


def config_knob(name):
    """The config's knob `name` (default, help, choices, range) as a field of
    another Knobs dataclass, for a setting both have: declared once, here."""
    field = config_field(name)
    return knob(field.default, field.metadata["help"], field.metadata["choices"],
                field.metadata["range"])


# The config's sections, each named with its first field (the fields below
# are grouped in this order): `--help` lists the flags by them.
SECTIONS = (("data", "dataset"), ("model", "backbone"), ("perturbation", "perturbation"),
            ("objective", "method"), ("optimisation", "batch_size"), ("evaluation", "knn_k"),
            ("scale", "strategy"), ("run", "seed"))


# The ramp of the per-compute form: the history mix rises over the first
# half of the run (docs/benchmarks.md, "The screen of per-compute forms").
PER_COMPUTE_RAMP = 0.5


@dataclasses.dataclass(frozen=True)
class SimCLICConfig(Knobs):
    """Every knob of a SimCLIC run."""

    # Data.
    dataset: str = knob(
        "shapes", "tfds name, dir:PATH, npz:PATH, shapes (drawn on the fly) or digits "
        "(ships with scikit-learn)"
    )
    eval_dataset: Optional[str] = knob(
        None,
        "labelled set for kNN and linear evaluation; default: the dataset's "
        "test split, else a held-out fraction of it",
    )
    data_dir: Optional[str] = knob(None, "tensorflow-datasets data directory")
    image_size: Optional[int] = knob(
        None, "resize images to this side length; default: the dataset's own",
        range=(8, 1024),
    )
    test_fraction: float = knob(
        0.2, "fraction held out for evaluation when the dataset has no test split",
        range=(0.01, 0.9),
    )
    data_storage: str = knob(
        "auto", "where the images are read from during the run: memory (decoded once, the "
        "fastest), stream (read and decoded from disk a batch at a time: any size), or "
        "auto (memory when the decoded set takes at most 1 GiB)",
        choices=("auto", "memory", "stream"))
    crop_min_scale: float = knob(
        0.2, "smallest area of the random resized crop, as a fraction of the image "
        "(SimSiam's 0.2; tiny images may need more)", range=(0.01, 1.0))
    # Model.
    backbone: str = knob("resnet18_cifar", "encoder backbone", choices=BACKBONES)
    width: int = knob(16, "base channel width of the backbone (16 runs on a CPU; the "
                      "paper's ResNet-18 is 64: --recipe cifar)", range=(1, 1024))
    bn_momentum: float = knob(
        0.9, "BatchNorm moving-average momentum in Keras terms (PyTorch's default "
        "0.1 is Keras 0.9; Keras's own 0.99 warms up too slowly for short runs)",
        range=(0.0, 0.9999),
    )
    zero_init_residual: bool = knob(
        False, "start each residual block as the identity (its last BatchNorm scale 0)")
    proj_dim: int = knob(512, "projector hidden and output size (sized for width 16; "
                         "the paper's 2048 goes with width 64)", range=(8, 65536))
    pred_hidden: int = knob(128, "predictor bottleneck size (the paper's 512 goes with "
                            "--proj-dim 2048)", range=(8, 65536))
    predictor: str = knob("mlp2", "predictor h", choices=PREDICTORS)
    # Perturbation.
    perturbation: str = knob(
        "history", "how the target view is built from z", choices=PERTURBATIONS
    )
    strength: Optional[float] = knob(
        None,
        "perturbation strength: history mix a, dropout rate, or noise scale s; "
        "default: the perturbation's own",
    )
    strength_ramp: Optional[float] = knob(
        None, "fraction of the run over which the history mix a ramps linearly from 0 "
        "(SimSiam's target) up to --strength; 0: a constant strength; default: "
        f"{PER_COMPUTE_RAMP} in the one-view form of --views's default, else 0",
        range=(0.0, 1.0))
    history_momentum: float = knob(
        0.0, "history buffer momentum m in H[i] <- m H[i] + (1-m) z", range=(0.0, 0.999)
    )
    bank_dtype: str = knob(
        "float32", "storage dtype of the history buffer", choices=("float32", "bfloat16")
    )
    bank_layout: str = knob(
        "auto", "how the replicas hold the history buffer: replicated (every replica holds "
        "all N rows, one collective per step), sharded (each replica holds about N/R rows, "
        "one more collective per step), or auto (sharded when there are several replicas "
        "and the replicated buffer would take more than 1 GiB per replica, else replicated)",
        choices=("auto", "replicated", "sharded"))
    kernel_impl: str = knob(
        "auto", "history and noise kernels: the C++ custom ops (custom_op, compiled on "
        "first use), the TensorFlow functions (tf), or auto (the custom ops where they "
        "build, else tf)", choices=("auto", "custom_op", "tf")
    )
    queue_size: int = knob(
        8192, "rows of the nearest_neighbour perturbation's support queue: the last this "
        "many first-view z (NNSiam, NNCLR)", range=(1, 1 << 24))
    # Objective.
    method: str = knob(
        "simclic", "the method, as knobs of this model: sets the knobs that define it and "
        "its recipe's (simclic_tf/methods.py); flags given override the recipe's",
        choices=METHODS)
    views: Optional[int] = knob(
        None, "augmented views per image; default: 1 for a history perturbation of the "
        "target without a momentum encoder or --second-view-size (SimCLIC's per-compute "
        "form: README, Which form to use), else 2", choices=(1, 2))
    second_view_size: int = knob(
        0, "side in pixels of the second view's crop (0: the images' own): a smaller "
        "second view, as multi-crop's small crops (Caron et al. 2020), costs less per step; "
        "needs --views 2", range=(0, 4096))
    perturb: str = knob(
        "target", "branch the perturbation is applied to", choices=("target", "online")
    )
    stop_gradient: bool = knob(True, "stop the gradient through the target branch")
    target_momentum: float = knob(
        0.0, "BYOL's momentum target: the target z come from a copy of the backbone and "
        "projector updated t <- tau t + (1 - tau) o after each step, tau rising from this "
        "value to 1 by a cosine over the run; 0: the target shares the online weights",
        range=(0.0, 0.9999))
    loss: str = knob("cosine", "distance D(p, t)", choices=LOSSES)
    temperature: float = knob(
        0.2, "temperature of the nt_xent loss (--method simclr's recipe)", range=(0.01, 10.0))
    # Optimisation.
    batch_size: int = knob(128, "global batch size", range=(2, 1 << 20))
    epochs: int = knob(20, "pretraining epochs", range=(1, 100000))
    time_budget: Optional[str] = knob(
        None, "pretrain for this wall-clock time instead of --epochs (90s, 30m, 2h): the "
        "first steps are timed and the epochs (and steps per epoch) planned, saved in "
        "config.json; at each epoch's end the length and schedules are fitted to the run's "
        "pace, to end near 95 % of it. Evaluation comes after it, timed apart")
    base_lr: float = knob(0.12, "learning rate at batch 256 (lr = base_lr * B / 256)",
                          range=(0.0, 100.0))
    momentum: float = knob(0.9, "SGD momentum", range=(0.0, 0.999))
    weight_decay: float = knob(
        5e-4, "L2 weight decay added to the gradient, as PyTorch SGD does",
        range=(0.0, 1.0),
    )
    steps_per_epoch: Optional[int] = knob(
        None, "training steps per epoch, as Keras's fit (logs, checkpoints and the kNN "
        "monitor come once an epoch); default: one pass over the data, N // batch size. "
        "The data run on across epochs, each pass a new permutation", range=(1, 10**9))
    warmup_epochs: int = knob(0, "linear learning-rate warm-up epochs", range=(0, 100000))
    pred_lr_scale: Optional[float] = knob(
        None, "predictor learning rate as a multiple of the encoder's; default: derived "
        "from the run's length (30 up to 1,560 steps, falling to 1 by 300,000)",
        range=(0.0, 1000.0))
    fix_pred_lr: bool = knob(
        True, "hold the predictor's learning rate at its peak while the encoder's "
        "decays (SimSiam's setting)")
    # Evaluation.
    knn_k: int = knob(200, "neighbours in the weighted kNN", range=(1, 100000))
    knn_t: float = knob(0.1, "temperature of the weighted kNN", range=(1e-4, 100.0))
    knn_bank_size: Optional[int] = knob(
        None, "at most this many labelled images (a stratified sample) form the kNN "
        "memory and train the linear and fine-tuned classifiers, for very large sets; "
        "default: all", range=(2, 10**9))
    knn_every: int = knob(1, "kNN monitor every N epochs (0: off)", range=(0, 100000))
    online_probe: bool = knob(
        False, "train a linear classifier on stop-gradient features during pretraining "
        "(needs labels; reported apart from the offline linear evaluation)")
    online_probe_lr: float = knob(
        0.1, "the online probe's fixed learning rate (no weight decay)", range=(0.0, 100.0))
    linear_epochs: int = knob(
        100, "epochs of the linear classifier on frozen features (0: skip)",
        range=(0, 100000),
    )
    finetune_epochs: int = knob(
        0, "epochs of fine-tuning the whole encoder plus a linear head with labels, "
        "backbone at 0.1 x the head's learning rate (0: skip)",
        range=(0, 100000),
    )
    # Scale.
    strategy: str = knob(
        "auto", "tf.distribute strategy: mirrored (the GPUs of this machine), multi_worker "
        "(the cluster of TF_CONFIG), tpu, default (one device), or auto (mirrored when "
        "several GPUs are visible, else default)",
        choices=("auto", "default", "mirrored", "multi_worker", "tpu"))
    sync_bn: bool = knob(
        False, "cross-replica BatchNorm (statistics over the global batch) in the backbone, "
        "projector and predictor")
    precision: str = knob(
        "auto", "compute precision; the mixed policies keep float32 weights, loss, "
        "normalisations and history math (float16 adds dynamic loss scaling); auto: "
        "mixed_bfloat16 where the CPU (AVX-512 BF16 or AMX) or the GPUs (capability 8.0 "
        "or more) compute bfloat16 natively, else float32; config.json holds the pick",
        choices=("auto", "float32", "mixed_float16", "mixed_bfloat16"))
    jit: Optional[bool] = knob(
        None, "XLA-compile the training step (model.compile(jit_compile=...)); "
        "default: Keras's auto (on where a GPU is visible)")
    # Run.
    seed: int = knob(0, "random seed", range=(0, 2**31 - 1))
    deterministic: bool = knob(
        False, "bit-identical reruns of a seed on one machine: TensorFlow's op "
        "determinism (augmentation then runs one batch at a time); on x86 CPUs set "
        "TF_ENABLE_ONEDNN_OPTS=0 too")
    stop_on_collapse: bool = knob(
        False, "end pretraining at the first epoch the collapse alarm fires (z_rank "
        "below its threshold), then evaluate and report as usual")
    run_dir: str = knob("runs/latest", "directory for logs, checkpoints and report")

    def _fill_defaults(self):
        """Fills `views` and `strength_ramp` where they are None with the form
        `per_compute_form` chooses, and remembers which, so that `replace`
        derives them again from the changed knobs."""
        filled = []
        if self.views is None:
            object.__setattr__(self, "views", 1 if self.per_compute_form else 2)
            filled.append("views")
        if self.strength_ramp is None:
            ramp = PER_COMPUTE_RAMP if self.views == 1 and self.per_compute_form else 0.0
            object.__setattr__(self, "strength_ramp", ramp)
            filled.append("strength_ramp")
        object.__setattr__(self, "_filled", tuple(filled))

    @property
    def per_compute_form(self):
        """Whether the run can take SimCLIC's per-compute form, one view with
        its history mix ramped in: a history perturbation (one the ramp applies
        to) of the target branch, which shares the online weights (no
        momentum encoder) and has no second-view size to honour."""
        return (PERTURBATIONS.get(self.perturbation).rampable and self.perturb == "target"
                and not self.target_momentum and not self.second_view_size)

    def replace(self, **changes):
        """This config with `changes`; the knobs it derived (`_fill_defaults`)
        and `changes` leaves alone are derived again."""
        derived_again = {name: None for name in self._filled if name not in changes}
        return super().replace(**derived_again, **changes)

    def _check_combinations(self):
        METHODS.get(self.method).check(self)
        if self.perturbation == "nearest_neighbour" and self.queue_size < self.batch_size:
            raise ConfigError(
                f"--queue-size {self.queue_size} is below --batch-size {self.batch_size}: each "
                "step enqueues the whole batch; give a queue at least one batch long")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        if self.second_view_size and self.views != 2:
            raise ConfigError(
                f"--second-view-size {self.second_view_size} needs --views 2 (given "
                f"--views {self.views}): it sizes the second view")
        if self.views == 1 and self.perturbation == "none":
            raise ConfigError(
                "--views 1 needs a perturbation (--perturbation history, dropout "
                "or noise): with 'none' the target is the online view itself, "
                "which teaches nothing"
            )
        if self.strength is not None:
            strength_range = PERTURBATIONS.get(self.perturbation).strength_range
            if strength_range is None:
                raise ConfigError(
                    f"--strength is not accepted with --perturbation {self.perturbation},"
                    " which has no strength; drop --strength or choose history, "
                    "dropout or noise"
                )
            low, high = strength_range
            if not low <= self.strength <= high:
                raise ConfigError(
                    f"--strength {self.strength} is out of range for "
                    f"--perturbation {self.perturbation}; accepted: {low} to {high}"
                )
        if self.strength_ramp and not PERTURBATIONS.get(self.perturbation).rampable:
            rampable = [name for name in PERTURBATIONS.names()
                        if PERTURBATIONS.get(name).rampable]
            raise ConfigError(
                f"--strength-ramp is not accepted with --perturbation {self.perturbation}; "
                f"it ramps the history mix of: {', '.join(rampable)}")

    def for_method(self, name, **overrides):
        """This config made method `name` (simclic_tf/methods.py): the
        method's knobs, then `overrides` (the flags given); an override that
        contradicts a knob defining the method is a ConfigError."""
        name = checked_value("method", name)
        return self.replace(**{**METHODS.get(name).knobs(), **overrides, "method": name})

    def for_budget(self, steps_per_epoch, total_steps=None):
        """(this config with every budget-derived knob left at None filled in,
        {knob: derived value}). A derived value is what `derive_pred_lr_scale`
        gives for the run's optimizer steps, `total_steps` (default `epochs *
        steps_per_epoch`; a budgeted run may end within an epoch); a value
        given explicitly is kept."""
        total_steps = total_steps or self.epochs * steps_per_epoch
        derived = {}
        if self.pred_lr_scale is None:
            derived["pred_lr_scale"] = derive_pred_lr_scale(total_steps)
        return self.replace(**derived), derived

    def epoch_steps(self, num_samples):
        """Steps in an epoch over `num_samples` images: `steps_per_epoch`, else
        one pass of whole batches."""
        return self.steps_per_epoch or num_samples // self.batch_size

    @property
    def learning_rate(self):
        """Peak learning rate, linearly scaled with the batch size (Goyal et al.)."""
        return self.base_lr * self.batch_size / 256

    @classmethod
    def from_dict(cls, values, base=None):
        """`base` (default: the defaults) with the keys of `values` replaced,
        after the knobs of the method that `values` names, if any (`for_method`)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown config keys {unknown}; accepted: {', '.join(sorted(known))}"
            )
        values = dict(values)
        if "method" in values:
            return (base or cls()).for_method(values.pop("method"), **values)
        return (base or cls()).replace(**values)

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def recipe(cls, name):
        """The config of the shipped preset `name`: `recipes/NAME.json` over the defaults."""
        if name not in recipe_names():
            raise ConfigError(f"--recipe {name!r} is not a shipped preset; choose one of: "
                              f"{', '.join(recipe_names())}")
        return cls.load(RECIPE_DIR / f"{name}.json", source="--recipe")

    @classmethod
    def load(cls, path, base=None, source="--config"):
        """The JSON config file at `path` (all knobs or some) over `base`;
        errors start with `source` (the flag that named the file) and `path`."""
        try:
            return cls.from_dict(read_values(path), base)
        except ConfigError as error:
            raise ConfigError(f"{source} {path}: {error}") from None


def read_values(path):
    """{knob: value} of the JSON config file at `path`."""
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read a JSON config ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError("expected a JSON object of knobs, such as {\"epochs\": 5}")
    return values


# Short runs learn only if the predictor adapts much faster than the encoder
# (30x, measured at 780 and 1,560 steps on CIFAR-10: docs/benchmarks.md); the
# published 800-epoch SimSiam recipe (about 300,000 steps) uses 1x. Between
# the two anchors the factor falls as a power law in the number of steps.
PRED_LR_ANCHORS = ((1560, 30.0), (300_000, 1.0))


def derive_pred_lr_scale(total_steps):
    """The predictor's learning-rate factor for a run of `total_steps` steps."""
    (short, fast), (long, slow) = PRED_LR_ANCHORS
    exponent = math.log(fast / slow) / math.log(long / short)
    factor = fast * (short / max(total_steps, 1)) ** exponent
    return round(min(fast, max(slow, factor)), 2)


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text):
    """Seconds of a duration such as '90s', '30m', '2h' or '1.5h'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh])\s*", str(text))
    if not match or float(match[1]) <= 0:
        raise ConfigError(f"--time-budget {text!r} is not a duration; accepted: a positive "
                          "number with s, m or h, such as 90s, 30m or 2h")
    return float(match[1]) * DURATION_UNITS[match[2]]


RECIPE_DIR = Path(__file__).parent / "recipes"


def recipe_names():
    """The shipped presets: one JSON config file each in simclic_tf/recipes/."""
    return sorted(path.stem for path in RECIPE_DIR.glob("*.json"))
