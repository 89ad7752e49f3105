"""Datasets by name, and the two sets a run reads: what it pretrains on and
what evaluation reports on.

A dataset name is one of (`DATA_SOURCES`, one class each):
- `shapes`: ten classes of shapes drawn on the fly (`simclic_tf.shapes`);
- `digits`: scikit-learn's handwritten digits, 1,797 8x8 grey images; no download;
- `npz:PATH`: arrays `x` (uint8, N x H x W x C, or N x H x W for grey), optional
  `y` (integer labels) and `class_names`;
- `dir:PATH`: one subfolder of images per class (class index = sorted folder
  names), or images directly in PATH (unlabeled);
- any other name: a tensorflow-datasets dataset (or `tfds:NAME`), read from
  `--data-dir` and downloaded there if it is not prepared yet.
The last three read files and live in `simclic_tf.file_sources`, which the
package imports so that they are registered.

A dataset opens as an image set with stable indices (`simclic_tf.images`):
a folder as its file list, decoded a batch at a time; an uncompressed .npz
memory-mapped; tensorflow-datasets from its prepared files. `load_images`
then keeps it so (`storage="stream"`), decodes it into memory ("memory"), or
chooses by its decoded size ("auto": memory up to `MEMORY_LIMIT`).
"""

import contextlib
import logging

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

from simclic_tf.config import ConfigError, field_choices, flag
from simclic_tf.images import ImageSet
from simclic_tf.registry import Registry
from simclic_tf.shapes import CLASS_NAMES, draw_shapes

DATA_SOURCES = Registry("data source")
STORAGES = field_choices("data_storage")
# "auto" decodes a set into memory up to this size: reading it is then a gather.
MEMORY_LIMIT = 2 ** 30

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset cannot be read or used; the message names the input at fault."""


class DataSource:
    """One way of naming a dataset; a new one is a subclass registered in DATA_SOURCES.

    `usage` is how it is spelled ("npz:PATH"); when it `takes_argument`, the part
    after the colon is the argument given to `load` and `test_split`.
    """

    usage = ""
    takes_argument = True

    def load(self, argument, split, data_dir, size):
        """The image set (`simclic_tf.images`) of `split`, opened without decoding
        it where the format allows; `size`, (height, width) or None, may be
        honoured (the caller resizes whatever comes back at another size)."""
        raise NotImplementedError

    def test_split(self, argument, data_dir):
        """The name of the split to evaluate on, or None when there is none."""
        return None

    def check_single_split(self, name, split):
        if split != "train":
            raise DataError(
                f"{name!r} is one set with no {split!r} split; evaluation holds out "
                f"{flag('test_fraction')} of it, or pass {flag('eval_dataset')}"
            )


@DATA_SOURCES.register("digits")
class Digits(DataSource):
    """scikit-learn's 1,797 handwritten digits: 8x8 grey, values 0..16 scaled to 0..255."""

    usage = "digits"
    takes_argument = False

    def load(self, argument, split, data_dir, size):
        self.check_single_split("digits", split)
        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
        return ImageSet(images, digits.target.astype(np.int64), [str(i) for i in range(10)])


@DATA_SOURCES.register("shapes")
class Shapes(DataSource):
    """Ten classes of shapes (disc, square, triangle, ...) drawn on the fly by
    NumPy (`simclic_tf.shapes`): no file, no download, the same images for a
    seed on every machine.

    The embedded default dataset. Each image has its own position, size,
    rotation, brightness, background gradient and pixel noise, so a random
    ResNet's features group images by those nuisances (kNN about 27 % at
    16 px) and pretraining has invariances to learn: a main job that shows
    learning in minutes on a CPU. The 8x8 `digits` cannot: a random ResNet
    already reaches 84 % kNN on them.
    """

    usage = "shapes"
    takes_argument = False
    counts = {"train": 3000, "test": 1000}
    side = 16

    def load(self, argument, split, data_dir, size):
        if split not in self.counts:
            raise DataError(f"'shapes' has the splits {sorted(self.counts)}, not {split!r}")
        height, width = size or (self.side, self.side)
        images, labels = draw_shapes(self.counts[split], height, width,
                                     seed=sorted(self.counts).index(split))
        return ImageSet(images, labels, list(CLASS_NAMES))

    def test_split(self, argument, data_dir):
        return "test"


def resolve(name):
    """The source instance and its argument for a dataset name."""
    prefix, colon, argument = name.partition(":")
    if colon and prefix in DATA_SOURCES:
        kind = prefix
    elif name in DATA_SOURCES:
        kind, argument = name, None
    else:
        return DATA_SOURCES.get("tfds")(), name
    source = DATA_SOURCES.get(kind)()
    if source.takes_argument != bool(argument):
        raise DataError(f"{name!r} is not accepted; write {source.usage}")
    return source, argument


def load_images(name, split="train", data_dir=None, image_size=None, storage="auto"):
    """The image set named `name` (see the module docstring), resized to
    `image_size` (a side length or a (height, width) pair) when it is given,
    in `storage`: "memory" (an `ImageSet`), "stream" (read from disk when a
    batch asks) or "auto" (memory when it decodes to `MEMORY_LIMIT` or less)."""
    if storage not in STORAGES:
        raise DataError(f"{flag('data_storage')} {storage!r} is not accepted; choose one "
                        f"of: {', '.join(STORAGES)}")
    source, argument = resolve(name)
    size = _size(image_size)
    images = source.load(argument, split, data_dir, size)
    if size is not None and tuple(images.image_shape[:2]) != size:
        images = images.resized(size)
    if storage == "memory" or (storage == "auto" and images.nbytes <= MEMORY_LIMIT):
        return to_memory(images, name)
    return images


def to_memory(images, name):
    """`images` decoded into an `ImageSet`; files that do not decode are left
    out, with one warning line that counts them and names the first few."""
    if isinstance(images, ImageSet):
        return images
    # Filled in place: one decoded copy, not a list of batches and their concatenation.
    pixels = np.empty((len(images), *images.image_shape), np.uint8)
    decoded = np.zeros(len(images), bool)
    if images.random_access:
        batches = images.read(tf.data.Dataset.range(len(images)).batch(1024), 1024)
    else:
        batches = images.stream().enumerate().batch(1024)
    for indices, batch in batches.as_numpy_iterator():
        pixels[indices] = batch
        decoded[indices] = True
    positions = np.flatnonzero(decoded)
    failed = np.flatnonzero(~decoded)
    if len(failed):
        pixels = pixels[positions]
        warn_skipped(images, failed, name)
    labels = None if images.labels is None else images.labels[positions]
    return ImageSet(pixels, labels, images.class_names)


def without_undecodable(images, name):
    """`images` without the files that do not decode (`Images.undecodable`),
    with one warning line that counts them: what a streamed training set
    skips, so that pretraining, the kNN memory and the pictures read the same
    images and none of them stops on a file."""
    failed = images.undecodable()
    if not len(failed):
        return images
    warn_skipped(images, failed, name)
    return images.subset(np.setdiff1d(np.arange(len(images)), failed))


def warn_skipped(images, failed, name):
    """The one warning line for the `failed` positions of `images` left out."""
    logger.warning("%s: skipped %d of %d image files that do not decode%s",
                   name, len(failed), len(images), file_names(images, failed))


def file_names(images, positions, shown=3):
    """": first, second, third, ..." of the files at `positions`, or "" for a
    set that is not read from files."""
    paths = getattr(images, "paths", None)
    if paths is None:
        return ""
    more = ", ..." if len(positions) > shown else ""
    return ": " + ", ".join(paths[i] for i in positions[:shown]) + more


def load_train_and_eval(config):
    """The pretraining set and the labelled set evaluation reports on, both
    checked before a run writes anything.

    The evaluation set is `config.eval_dataset` (its test split if it has one,
    else all of it), else the dataset's own test split, else a held-out
    `test_fraction` of the dataset (stratified by label, `seed`). It is resized
    to the training images' size. Streamed image files that do not decode are
    left out of the training set (`without_undecodable`) and refused in the
    evaluation set (`load_evaluation_set`).
    """
    test_split, storage = None, config.data_storage
    with _blame("dataset"):
        train = load_images(config.dataset, "train", config.data_dir, config.image_size,
                            storage)
        train = without_undecodable(train, config.dataset)
        size = train.image_shape[:2]
        if not config.eval_dataset:
            source, argument = resolve(config.dataset)
            test_split = source.test_split(argument, config.data_dir)
        if test_split:
            evaluation = load_evaluation_set(config.dataset, test_split, size, config)
    if config.eval_dataset:
        with _blame("eval_dataset"):
            source, argument = resolve(config.eval_dataset)
            split = source.test_split(argument, config.data_dir) or "train"
            evaluation = load_evaluation_set(config.eval_dataset, split, size, config)
    elif not test_split:
        train, evaluation = hold_out(train, config)
    check_evaluation_set(evaluation, train, config, test_split)
    check_knn_bank_size(config.knn_bank_size, train, evaluation)
    return train, evaluation


def load_evaluation_set(name, split, size, config):
    """The images of `split` of `name` at `size`, refused when some of its
    files do not decode: evaluation reads every image, its features in the
    order of the labels, so it cannot skip one as pretraining does."""
    evaluation = load_images(name, split, config.data_dir, size, config.data_storage)
    failed = evaluation.undecodable()
    if len(failed):
        raise DataError(
            f"{name!r}: {len(failed)} of its {len(evaluation)} image files do not decode"
            f"{file_names(evaluation, failed)}; remove or fix them, or pass "
            f"{flag('data_storage')} memory, which decodes the set once and leaves them out")
    return evaluation


def check_evaluation_set(evaluation, train, config, test_split):
    """Refuses an evaluation set that cannot score the training images'
    features: no labels, a single class, or other channels."""
    if evaluation.labels is None:
        name = config.eval_dataset or f"{config.dataset}, split {test_split}"
        raise DataError(
            f"{flag('eval_dataset')}: the evaluation set ({name}) has no labels; pass a "
            "labelled set: dir:PATH with one folder per class, npz:PATH with y, or a "
            "labelled tensorflow-datasets name"
        )
    present = np.unique(evaluation.labels)
    if len(present) < 2:
        name = config.eval_dataset or config.dataset
        raise DataError(
            f"{flag('eval_dataset')}: the evaluation set ({name}) holds a single class "
            f"(label {present[0]}), so every kNN and linear prediction would be right; pass "
            "a labelled set of two classes or more")
    if evaluation.image_shape[-1] != train.image_shape[-1]:
        raise DataError(
            f"{flag('eval_dataset')}: the evaluation images have "
            f"{evaluation.image_shape[-1]} channels and the training images "
            f"{train.image_shape[-1]}; expected the same"
        )


def check_knn_bank_size(bank_size, train, evaluation):
    """Refuses a kNN memory cap below the number of classes of the images the
    memory is drawn from (`evaluation.labelled_memory`: the training set when
    it is labelled, else the evaluation set), since a stratified sample holds
    at least one image of each class."""
    labels = train.labels if train.labels is not None else evaluation.labels
    classes = len(np.unique(labels))
    if bank_size is not None and bank_size < classes:
        raise ConfigError(
            f"{flag('knn_bank_size')} {bank_size} is smaller than the {classes} classes the "
            f"kNN memory is drawn from, and its stratified sample holds an image of each; "
            f"accepted: {classes} or more")


def hold_out(data, config):
    """(rest, held-out labelled `test_fraction`), stratified by label, rows kept in order."""
    if data.labels is None:
        raise DataError(
            f"{flag('eval_dataset')} is needed: {config.dataset!r} has no labels and no "
            "test split, so no labelled evaluation set can be held out of it; pass a "
            "labelled set: dir:PATH with one folder per class, npz:PATH with y, or a "
            "labelled tensorflow-datasets name"
        )
    try:
        return data.stratified_split(config.test_fraction, config.seed)
    except ValueError as error:
        raise DataError(
            f"{flag('test_fraction')} {config.test_fraction} cannot hold out a stratified "
            f"set of {config.dataset!r} ({len(data)} images, {data.num_classes} classes): "
            f"{error}; change {flag('test_fraction')} or pass {flag('eval_dataset')}"
        ) from None


@contextlib.contextmanager
def _blame(field):
    """Prefixes the DataErrors raised inside with the flag whose value caused them."""
    try:
        yield
    except DataError as error:
        raise DataError(f"{flag(field)} {error}") from error


def _size(image_size):
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)):
        return (int(image_size), int(image_size))
    return tuple(int(side) for side in image_size)
