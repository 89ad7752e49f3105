"""Transfer evaluation (the paper's Table 2 protocol, docs/DESIGN.md section 2):
one pretrained encoder, linear-evaluated and fine-tuned on many labelled
datasets, printed as one table of error rates beside the paper's.

    simclic transfer --encoder runs/latest/encoder.keras \\
        --datasets cifar10,cifar100,npz:PATH,dir:PATH [--data-dir DIR] \\
        [--linear-epochs N] [--finetune-epochs N] [--out DIR]

Every dataset goes through `simclic_tf.sources` (tensorflow-datasets names,
`dir:PATH`, `npz:PATH`, `digits`), resized to the encoder's input size and
converted to its channel count. The test set is the dataset's own test split
(else its validation split), else a held-out `--test-fraction` of the training
split, stratified by label with `--seed`. `--datasets paper` is the paper's
list. An entry `LABEL=NAME` names the column (and picks the paper's numbers):
`aircraft=dir:PATH`, since tensorflow-datasets has no FGVC-Aircraft.

VOC2007 is multi-label and the paper reports its mAP; the loaders here are
single-label, so `voc/2007` gets an "unsupported" column rather than a wrong
number.

Writes `transfer.md`, `transfer.csv` and `transfer.json` in `--out` (default:
`transfer/` beside the encoder), rewritten after each dataset so that a
failure keeps the columns already done.
"""

import csv
import dataclasses
import json
import logging
import os
import typing
from pathlib import Path

import keras
import numpy as np

from simclic_tf import sources
from simclic_tf.cli import add_knob_flags, flags_given
from simclic_tf.config import ConfigError, SimCLICConfig, config_knob, flag
from simclic_tf.evaluation import extract_features, linear_accuracy
from simclic_tf.file_sources import TFDS
from simclic_tf.finetune import finetune_accuracy
from simclic_tf.images import ImageSet
from simclic_tf.knobs import Knobs, knob
from simclic_tf.sources import DataError

logger = logging.getLogger(__name__)

# The paper's transfer datasets, as tensorflow-datasets names. FGVC-Aircraft is
# not in tensorflow-datasets (4.9): give it as aircraft=dir:PATH.
PAPER_DATASETS = ("cifar10", "cifar100", "caltech101", "cars196", "dtd", "oxford_flowers102",
                  "food101", "oxford_iiit_pet", "sun397", "voc/2007")

# SimCLIC's own transfer error rates (%), the SimCLIC rows of the paper's
# Table 2 (Yang and Li, JSSI 2023; copied in ../shared/paper/simclic-tables.md),
# {(perturbation, protocol): {column label: error}}. The columns are the labels
# of PAPER_DATASETS, and "aircraft" (aircraft=dir:PATH). VOC2007 is as the paper
# prints it (it reports mAP there; ours is "unsupported").
PAPER_COLUMNS = ("aircraft", "caltech101", "cars196", "cifar10", "cifar100", "dtd",
                 "oxford_flowers102", "food101", "oxford_iiit_pet", "sun397", "voc/2007")
PAPER_ERRORS = {
    (perturbation, protocol): dict(zip(PAPER_COLUMNS, errors))
    for (perturbation, protocol), errors in {
        ("history", "linear"):
            (56.15, 12.12, 54.26, 5.97, 25.96, 26.40, 9.52, 28.76, 18.78, 40.18, 18.56),
        ("dropout", "linear"):
            (57.09, 12.35, 54.52, 6.00, 26.18, 27.02, 9.47, 29.82, 18.93, 40.61, 18.89),
        ("noise", "linear"):
            (55.86, 11.92, 53.89, 5.92, 25.65, 26.04, 9.50, 29.51, 18.75, 40.12, 18.55),
        ("history", "fine-tuned"):
            (22.86, 11.75, 19.56, 3.12, 19.65, 29.58, 4.86, 20.84, 17.46, 42.15, 21.21),
        ("dropout", "fine-tuned"):
            (22.24, 12.27, 20.12, 3.11, 20.48, 29.46, 5.68, 20.97, 17.79, 42.68, 21.86),
        ("noise", "fine-tuned"):
            (22.46, 11.72, 19.89, 2.94, 19.62, 28.92, 4.51, 21.18, 17.28, 42.38, 21.37),
    }.items()
}

# (title, whose, protocol): the paper's rows take their numbers from
# PAPER_ERRORS[protocol], one row per perturbation the paper reports.
ROWS = ((("ours linear", "ours", "linear"), ("ours fine-tuned", "ours", "fine-tuned"))
        + tuple((f"paper SimCLIC {protocol} ({perturbation})", "paper",
                 (perturbation, protocol))
                for protocol in ("linear", "fine-tuned")
                for perturbation in ("history", "dropout", "noise")))
DATASETS_FLAG = "--datasets"


@dataclasses.dataclass
class Entry:
    """One dataset of the table: its column label, data name, and whether it is
    supported (else `reason` says why not)."""

    label: str
    name: str
    reason: typing.Optional[str] = None


@dataclasses.dataclass(frozen=True)
class TransferConfig(Knobs):
    """The settings of a transfer evaluation, `simclic transfer`'s flags. The
    evaluation's knobs are the config's own (`config_knob`): they read and
    check as in `simclic train`."""

    encoder: str = knob(dataclasses.MISSING, "the pretrained encoder, RUN_DIR/encoder.keras")
    datasets: str = knob(dataclasses.MISSING, "comma-separated: tensorflow-datasets names, "
                         "dir:PATH, npz:PATH, digits, LABEL=NAME, or paper (the paper's list)")
    data_dir: typing.Optional[str] = config_knob("data_dir")
    linear_epochs: int = config_knob("linear_epochs")
    finetune_epochs: int = config_knob("finetune_epochs")
    test_fraction: float = config_knob("test_fraction")
    seed: int = config_knob("seed")
    out: typing.Optional[str] = knob(None, "output folder (default: transfer/ beside the "
                                     "encoder)")

    @property
    def out_dir(self):
        """Where the tables go: `out`, else transfer/ beside the encoder."""
        return self.out or os.path.join(os.path.dirname(os.path.abspath(self.encoder)),
                                        "transfer")


def load_encoder(path):
    """The encoder saved as .keras; errors name --encoder."""
    if not os.path.isfile(path):
        raise DataError(f"--encoder {path}: no such file; expected the encoder.keras that "
                        "train.py writes in its --run-dir")
    try:
        encoder = keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as error:  # corrupt, not a .keras, unknown layers, ...
        raise DataError(f"--encoder {path}: cannot load it as a Keras model "
                        f"({type(error).__name__}: {error}); expected the encoder.keras "
                        "that train.py writes") from None
    shape = tuple(encoder.input_shape[1:])
    if len(shape) != 3 or None in shape or shape[-1] not in (1, 3):
        raise DataError(f"--encoder {path}: input shape {shape}; expected a fixed "
                        "(height, width, 1 or 3) image input")
    return encoder


def parse_datasets(text, data_dir=None):
    """The entries of a --datasets value (comma-separated; `paper` expands to
    PAPER_DATASETS), checked without loading any images."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise DataError(f"{DATASETS_FLAG} is empty; expected a comma-separated list of "
                        "tensorflow-datasets names, dir:PATH, npz:PATH or digits")
    expanded = []
    for name in names:
        expanded += PAPER_DATASETS if name == "paper" else [name]
    entries = [_entry(name, data_dir) for name in expanded]
    labels = [entry.label for entry in entries]
    if len(set(labels)) != len(labels):
        raise DataError(f"{DATASETS_FLAG} names a column twice ({', '.join(labels)}); "
                        "give each a distinct LABEL=NAME")
    return entries


def _entry(text, data_dir):
    label, equals, name = text.partition("=")
    if not equals or ":" in label or "/" in label:
        label, name = None, text
    try:
        source, argument = sources.resolve(name)
    except DataError as error:
        raise DataError(f"{DATASETS_FLAG} {error}") from None
    if isinstance(source, TFDS):
        label = label or name
        return Entry(label, name, _tfds_problem(argument, data_dir))
    if argument is not None and not os.path.exists(argument):
        raise DataError(f"{DATASETS_FLAG} {name!r}: {argument} does not exist; expected "
                        f"{source.usage}")
    return Entry(label or (f"{name.partition(':')[0]}:{Path(argument).name}"
                           if argument else name), name)


def _tfds_problem(name, data_dir):
    """Why a tensorflow-datasets name cannot be used here (None: it can);
    reads the builder's declared features, downloads nothing."""
    import tensorflow_datasets as tfds

    try:
        features = tfds.builder(name, data_dir=data_dir).info.features
    except Exception:  # DatasetNotFoundError, or not even a valid name
        local = ", ".join(sources.DATA_SOURCES.get(n).usage for n in sources.DATA_SOURCES.names()
                          if n != "tfds")
        raise DataError(f"{DATASETS_FLAG} {name!r} is neither a local form ({local}) nor a "
                        "tensorflow-datasets name") from None
    if "image" not in features:
        raise DataError(f"{DATASETS_FLAG} {name!r} has no 'image' feature")
    if "label" in features:
        return None
    if "labels" in features:
        return ("multi-label (the paper reports mAP); not supported: this evaluation is "
                "single-label classification")
    raise DataError(f"{DATASETS_FLAG} {name!r} has no 'label' feature; transfer needs "
                    "labelled images")


def load_split(name, image_shape, data_dir=None, test_fraction=0.2, seed=0):
    """(train, test, how the test set was formed) of dataset `name`, resized and
    converted to `image_shape` (height, width, channels), in memory (the
    transfer sets are small; their channels are converted as arrays)."""
    source, argument = sources.resolve(name)
    size = tuple(image_shape[:2])
    train = sources.load_images(name, "train", data_dir, size, storage="memory")
    if train.labels is None:
        raise DataError(f"{DATASETS_FLAG} {name!r} has no labels; transfer needs them")
    split = source.test_split(argument, data_dir)
    if split:
        test = sources.load_images(name, split, data_dir, size, storage="memory")
        how = f"its {split} split"
    else:
        config = SimCLICConfig(dataset=name, test_fraction=test_fraction, seed=seed)
        train, test = sources.hold_out(train, config)
        how = (f"held out {test_fraction:g} of train (stratified, {flag('seed')} {seed})")
    channels = image_shape[-1]
    return _with_channels(train, channels), _with_channels(test, channels), how


def _with_channels(images, channels):
    """The ImageSet with `channels` (1 or 3): grey repeated to RGB, RGB to luma."""
    pixels = images.images
    if pixels.shape[-1] == channels:
        return images
    if channels == 3:
        pixels = np.repeat(pixels, 3, axis=-1)
    else:
        luma = np.array([0.299, 0.587, 0.114], np.float32)
        pixels = np.round(pixels.astype(np.float32) @ luma).astype(np.uint8)[..., None]
    return ImageSet(pixels, images.labels, images.class_names)


def evaluate(encoder, train, test, config):
    """{"linear_error", "finetune_error"} in %, None where the TransferConfig
    `config`'s epochs are 0."""
    num_classes = max(train.num_classes, int(test.labels.max()) + 1)
    results = {"linear_error": None, "finetune_error": None}
    if config.linear_epochs:
        accuracy = linear_accuracy(
            extract_features(encoder, train.images), train.labels,
            extract_features(encoder, test.images), test.labels, num_classes,
            epochs=config.linear_epochs, seed=config.seed)
        results["linear_error"] = 100.0 * (1.0 - accuracy)
    if config.finetune_epochs:
        accuracy = finetune_accuracy(encoder, train, test, config.finetune_epochs,
                                     seed=config.seed)
        results["finetune_error"] = 100.0 * (1.0 - accuracy)
    return results


def transfer(config):
    """Evaluates the encoder on each dataset as the TransferConfig `config`
    says; returns the result dict, and writes the tables to `config.out_dir`
    after each dataset, so that a failure keeps the columns already done."""
    encoder = load_encoder(config.encoder)
    entries = parse_datasets(config.datasets, config.data_dir)
    image_shape = tuple(encoder.input_shape[1:])
    results = {
        "encoder": config.encoder,
        "input_shape": list(image_shape),
        "settings": {name: getattr(config, name) for name in
                     ("linear_epochs", "finetune_epochs", "test_fraction", "seed")},
        "datasets": {},
    }
    for entry in entries:
        row = {"name": entry.name}
        if entry.reason:
            row.update(status="unsupported", reason=entry.reason)
            logger.warning("%s: %s", entry.label, entry.reason)
        else:
            try:
                train, test, how = load_split(entry.name, image_shape, config.data_dir,
                                              config.test_fraction, config.seed)
            except DataError as error:
                message = str(error)
                if not message.startswith(DATASETS_FLAG):
                    message = f"{DATASETS_FLAG} {entry.name!r}: {message}"
                raise DataError(message) from error
            row.update(status="ok", train_images=len(train), test_images=len(test),
                       num_classes=train.num_classes, test_set=how)
            row.update(evaluate(encoder, train, test, config))
            logger.info("%s: %d train, %d test images (%s); linear error %s, "
                        "fine-tuned error %s", entry.label, len(train), len(test), how,
                        _cell(row["linear_error"], "not run"),
                        _cell(row["finetune_error"], "not run"))
        results["datasets"][entry.label] = row
        write_tables(results, config.out_dir)
    return results


def table(results):
    """(header, rows): one column per dataset, one row per ROWS entry, cells as text."""
    labels = list(results["datasets"])
    rows = []
    for title, who, protocol in ROWS:
        cells = []
        for label in labels:
            row = results["datasets"][label]
            if who == "paper":
                cells.append(_cell(PAPER_ERRORS[protocol].get(label), "n/a"))
            elif row["status"] != "ok":
                cells.append(row["status"])
            else:
                key = "linear_error" if protocol == "linear" else "finetune_error"
                cells.append(_cell(row[key], "not run"))
        rows.append([title] + cells)
    return ["error %"] + labels, rows


def _cell(value, missing):
    return missing if value is None else f"{value:.2f}"


def _epochs(count):
    return f"{count} epoch" + ("" if count == 1 else "s")


def markdown(results):
    header, rows = table(results)
    settings = results["settings"]
    lines = [
        "# Transfer: top-1 error rates (%)",
        "",
        f"Encoder `{results['encoder']}`, input {results['input_shape']}; linear classifier "
        f"on frozen features ({_epochs(settings['linear_epochs'])}) and fine-tuning of the "
        f"whole encoder plus a linear head ({_epochs(settings['finetune_epochs'])}).",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ] + ["| " + " | ".join(row) + " |" for row in rows] + [""]
    for label, row in results["datasets"].items():
        if row["status"] == "ok":
            lines.append(f"- {label} (`{row['name']}`): {row['train_images']} train and "
                         f"{row['test_images']} test images, {row['num_classes']} classes; "
                         f"test set: {row['test_set']}")
        else:
            lines.append(f"- {label} (`{row['name']}`): {row['status']}: {row['reason']}")
    lines.append("- paper rows: SimCLIC's own errors in the paper's Table 2 (Yang and Li, "
                 "JSSI 2023; 1000 epochs of pretraining, backbone and pretraining set not "
                 "stated), one row per perturbation; n/a where the paper has no such column")
    return "\n".join(lines) + "\n"


def write_tables(results, out):
    os.makedirs(out, exist_ok=True)
    header, rows = table(results)
    with open(os.path.join(out, "transfer.json"), "w") as f:
        json.dump({**results, "table": {"header": header, "rows": rows}}, f, indent=2)
    with open(os.path.join(out, "transfer.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    with open(os.path.join(out, "transfer.md"), "w") as f:
        f.write(markdown(results))


SUMMARY = "linear and fine-tuned transfer of an exported encoder to other datasets (Table 2)"


def add_arguments(parser):
    add_knob_flags(parser, TransferConfig)


def command(args, parser):
    """`simclic transfer`: writes and prints the table; the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = TransferConfig(**flags_given(args, TransferConfig))
        results = transfer(config)
    except (ConfigError, DataError) as error:
        parser.error(str(error))
    print(markdown(results))
    print(f"written: {os.path.join(config.out_dir, 'transfer.md')}, transfer.csv, "
          "transfer.json")
    return 0
