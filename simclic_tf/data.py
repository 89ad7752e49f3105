"""Datasets by name, and the tf.data pipelines that feed pretraining and evaluation.

A dataset name is one of (`DATA_SOURCES`, one class each):
- `digits`: scikit-learn's handwritten digits, 1,797 8x8 grey images; no download;
- `npz:PATH`: arrays `x` (uint8, N x H x W x C, or N x H x W for grey), optional
  `y` (integer labels) and `class_names`;
- `dir:PATH`: one subfolder of images per class (class index = sorted folder
  names), or images directly in PATH (unlabeled);
- any other name: a tensorflow-datasets dataset (or `tfds:NAME`), read from
  `--data-dir` and downloaded there if it is not prepared yet.

Limitation of this first version: every dataset is materialised in memory as
one uint8 array (N x H x W x C), so it must fit in RAM (CIFAR-10: 150 MB;
ImageNet at 224 px would not), and the arrays are captured by the tf.data
pipelines as constants, which caps them at 2 GB wherever the pipeline graph is
serialised (tf.data service, some tf.distribute rewrites).
"""

import contextlib
import dataclasses
import logging
import os
import socket
from pathlib import Path
from typing import List, Optional

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from simclic_tf.config import flag
from simclic_tf.registry import Registry

DATA_SOURCES = Registry("data source")
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
AUTOTUNE = tf.data.AUTOTUNE
# tensorflow-datasets' mirror, which it tries first for every download.
DOWNLOAD_HOST = ("storage.googleapis.com", 443)
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset cannot be read or used; the message names the input at fault."""


@dataclasses.dataclass
class ImageSet:
    """Images in memory: uint8 (N, H, W, C), int64 labels (N,) or None if unlabeled."""

    images: np.ndarray
    labels: Optional[np.ndarray]
    class_names: List[str]

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def image_shape(self):
        return self.images.shape[1:]

    def __len__(self):
        return len(self.images)

    def subset(self, indices):
        labels = None if self.labels is None else self.labels[indices]
        return ImageSet(self.images[indices], labels, self.class_names)

    def stratified_split(self, fraction, seed):
        """(rest, held-out `fraction`), stratified by label and seeded, rows kept
        in order. Raises scikit-learn's ValueError when a class is too small."""
        rest, held_out = train_test_split(np.arange(len(self)), test_size=fraction,
                                          random_state=seed, stratify=self.labels)
        return self.subset(np.sort(rest)), self.subset(np.sort(held_out))


class DataSource:
    """One way of naming a dataset; a new one is a subclass registered in DATA_SOURCES.

    `usage` is how it is spelled ("npz:PATH"); when it `takes_argument`, the part
    after the colon is the argument given to `load` and `test_split`.
    """

    usage = ""
    takes_argument = True

    def load(self, argument, split, data_dir, size):
        """The ImageSet of `split`; `size`, (height, width) or None, may be honoured
        while decoding (the caller resizes whatever comes back at another size)."""
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
    NumPy: no file, no download, the same images for a seed on every machine.

    The embedded default dataset. Each image has its own position, size,
    rotation, brightness, background gradient and pixel noise, so a random
    ResNet's features group images by those nuisances (kNN about 27 % at
    16 px) and pretraining has invariances to learn: a main job that shows
    learning in minutes on a CPU. The 8x8 `digits` cannot: a random ResNet
    already reaches 84 % kNN on them.
    """

    usage = "shapes"
    takes_argument = False
    class_names = ["disc", "square", "triangle", "ring", "plus", "diamond", "bar",
                   "star", "half-disc", "frame"]
    counts = {"train": 3000, "test": 1000}
    side = 16

    def load(self, argument, split, data_dir, size):
        if split not in self.counts:
            raise DataError(f"'shapes' has the splits {sorted(self.counts)}, not {split!r}")
        height, width = size or (self.side, self.side)
        images, labels = draw_shapes(self.counts[split], height, width,
                                     seed=sorted(self.counts).index(split))
        return ImageSet(images, labels, list(self.class_names))

    def test_split(self, argument, data_dir):
        return "test"


def shape_masks(u, v):
    """Whether each point (u, v), in the shape's own frame scaled to its radius,
    lies inside each of the ten shapes, in `Shapes.class_names` order."""
    r, box = np.hypot(u, v), np.maximum(abs(u), abs(v))
    return [r < 1, box < 0.8, (v > -0.5) & (abs(u) < (1 - v) * 0.577),
            (r > 0.55) & (r < 1), ((abs(u) < 0.3) | (abs(v) < 0.3)) & (box < 1),
            abs(u) + abs(v) < 1, (abs(u) < 1) & (abs(v) < 0.35),
            r < 0.6 + 0.4 * np.cos(5 * np.arctan2(v, u)), (r < 1) & (v > 0),
            (box < 0.85) & (box > 0.5)]


def draw_shapes(count, height, width, seed):
    """(uint8 images (count, height, width, 3), int64 labels), classes balanced.
    Shapes are rendered at twice the size and averaged down, for soft edges."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % len(Shapes.class_names))
    side = min(height, width)

    def draw(*shape, low=0.0, high=1.0):
        return rng.uniform(low, high, (count,) + shape)

    centre = draw(2, 1, 1, low=0.3, high=0.7) * np.array([width, height])[:, None, None]
    radius = draw(1, 1, low=0.2, high=0.4) * side
    angle = draw(1, 1, low=-0.3, high=0.3)
    ys, xs = np.meshgrid((np.arange(2 * height) + 0.5) / 2, (np.arange(2 * width) + 0.5) / 2,
                         indexing="ij")
    dx, dy = xs - centre[:, 0], ys - centre[:, 1]
    u = (np.cos(angle) * dx + np.sin(angle) * dy) / radius
    v = (np.cos(angle) * dy - np.sin(angle) * dx) / radius
    inside = np.zeros(u.shape, np.float32)
    for label, mask in enumerate(shape_masks(u, v)):
        rows = labels == label
        inside[rows] = mask[rows]
    coverage = inside.reshape(count, height, 2, width, 2).mean(axis=(2, 4))[..., None]
    # A light shape on a dark, shaded background, both tinted alike: brightness,
    # contrast and tint vary within the colour jitter's range, so that colour
    # tells one image from another no better than the augmentation allows.
    tint = draw(1, 1, 3, low=0.8, high=1.2)
    foreground = draw(1, 1, 1, low=0.6, high=0.95) * tint
    background = draw(1, 1, 1, low=0.05, high=0.4) * tint
    direction = draw(1, 1, high=2 * np.pi)
    ramp = (np.cos(direction) * (xs[::2, ::2] / width - 0.5)
            + np.sin(direction) * (ys[::2, ::2] / height - 0.5))
    background = background * (1 + draw(1, 1, high=0.8) * ramp)[..., None]
    pixels = coverage * foreground + (1 - coverage) * background
    pixels += rng.normal(0, 0.05, pixels.shape)
    return (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.int64)


@DATA_SOURCES.register("npz")
class Npz(DataSource):
    """A NumPy .npz: `x` uint8 (N, H, W, C) or (N, H, W), optional `y` and `class_names`."""

    usage = "npz:PATH"
    expected = ("arrays x (uint8, N x H x W x C with C 1 or 3, or N x H x W), "
                "optional y (integer labels 0..K-1, length N) and class_names")

    def load(self, path, split, data_dir, size):
        name = f"npz:{path}"
        self.check_single_split(name, split)
        try:
            # No pickle: an .npz must not be able to run code.
            with np.load(path) as arrays:
                found = {key: arrays[key] for key in ("x", "y", "class_names")
                         if key in arrays.files}
        except (OSError, ValueError, AttributeError) as error:
            raise DataError(
                f"{name!r}: cannot read it as an .npz without pickle ({error}); "
                f"expected a file written by np.savez with {self.expected}"
            ) from None
        if "x" not in found:
            raise DataError(f"{name!r} has no array 'x'; expected {self.expected}")
        images = found["x"]
        if images.dtype != np.uint8:
            raise DataError(
                f"{name!r}: array 'x' has dtype {images.dtype}; expected uint8 pixels "
                "0..255 (floats in [0, 1]: save (x * 255).round().astype('uint8'))"
            )
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
            raise DataError(
                f"{name!r}: array 'x' has shape {images.shape}; expected N x H x W x C "
                "with N > 0 and C 1 (grey) or 3 (RGB), or N x H x W"
            )
        if "y" not in found:
            return ImageSet(images, None, [])
        labels = found["y"]
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{name!r}: array 'y' has shape {labels.shape} and dtype {labels.dtype}; "
                f"expected integer labels of shape ({len(images)},), one per image of 'x'"
            )
        if labels.min() < 0:
            raise DataError(f"{name!r}: array 'y' has negative labels; expected 0..K-1")
        num_classes = int(labels.max()) + 1
        class_names = [str(i) for i in range(num_classes)]
        if "class_names" in found:
            class_names = [str(c) for c in found["class_names"]]
            if len(class_names) < num_classes:
                raise DataError(
                    f"{name!r}: array 'class_names' has {len(class_names)} names but "
                    f"'y' has labels up to {num_classes - 1}; expected one name per class"
                )
        return ImageSet(images, labels.astype(np.int64), class_names)


@DATA_SOURCES.register("dir")
class Directory(DataSource):
    """A folder of images: one subfolder per class, or the images directly (unlabeled).

    As Keras's `image_dataset_from_directory`: every subfolder is a class, class
    index = position in the sorted folder names, and with subfolders present
    files directly in PATH are ignored. Images (by extension: BMP, GIF, JPEG,
    PNG, searched recursively) are decoded in a parallel tf.data map, as RGB,
    then kept grey (C = 1) if every image is grey. They are resized to `size`,
    by default the size of the first image that decodes (sorted order).
    A file that does not decode is skipped; one warning line counts them and
    names the first few. A folder where nothing decodes is an error.
    """

    usage = "dir:PATH"

    def load(self, path, split, data_dir, size):
        name = f"dir:{path}"
        self.check_single_split(name, split)
        root = Path(path)
        if not root.is_dir():
            raise DataError(f"{name!r}: no such folder; expected a folder with one "
                            "subfolder of images per class, or the images themselves")
        class_dirs = sorted(d for d in root.iterdir()
                            if d.is_dir() and not d.name.startswith("."))
        if class_dirs:
            files, labels = [], []
            for label, class_dir in enumerate(class_dirs):
                found = _image_files(class_dir)
                files += found
                labels += [label] * len(found)
            labels, class_names = np.array(labels, np.int64), [d.name for d in class_dirs]
        else:
            files, labels, class_names = _image_files(root), None, []
        if not files:
            raise DataError(f"{name!r} holds no image files "
                            f"({', '.join(IMAGE_EXTENSIONS)}), in it or in its subfolders")
        images, decoded = _decode_files(files, size, name)
        if labels is not None:
            labels = labels[decoded]
        return ImageSet(images, labels, class_names)


@DATA_SOURCES.register("tfds")
class TFDS(DataSource):
    """A tensorflow-datasets dataset: features "image" and (if labelled) "label"."""

    usage = "tfds:NAME"  # or NAME alone, when no other source claims it

    def load(self, name, split, data_dir, size):
        builder = self.builder(name, data_dir)
        features = builder.info.features
        if "image" not in features:
            raise DataError(f"{name!r} has no 'image' feature; features: {list(features)}")
        if size is None and None in features["image"].shape[:2]:
            raise DataError(f"{name!r} has images of varying size; choose one with "
                            f"{flag('image_size')}")
        try:
            examples = builder.as_dataset(split=split, shuffle_files=False)
        except (ValueError, KeyError) as error:
            raise DataError(f"{name!r} has no split {split!r} ({error}); its splits: "
                            f"{', '.join(builder.info.splits) or 'unknown'}") from None
        labelled = "label" in features

        def convert(example):
            image = example["image"]
            if size is not None:
                image = _resize(image, size)
            return image, example["label"] if labelled else 0

        images, labels = [], []
        for image, label in examples.map(convert, AUTOTUNE).batch(1024).as_numpy_iterator():
            images.append(image)
            labels.append(label)
        if not images:
            raise DataError(f"{name!r}: split {split!r} is empty")
        images = np.concatenate(images)
        if not labelled:
            return ImageSet(images, None, [])
        labels = np.concatenate(labels).astype(np.int64)
        class_names = (getattr(features["label"], "names", None)
                       or [str(i) for i in range(labels.max() + 1)])
        return ImageSet(images, labels, list(class_names))

    def test_split(self, name, data_dir):
        """"test", else "validation" (ImageNet's evaluation split), else None."""
        splits = self.builder(name, data_dir).info.splits
        return next((s for s in ("test", "validation") if s in splits), None)

    def builder(self, name, data_dir):
        """The prepared builder; downloads and prepares it on first use."""
        # Imported here: tensorflow_datasets is slow to import and only this source needs it.
        import tensorflow_datasets as tfds

        local_forms = ", ".join(DATA_SOURCES.get(n).usage for n in DATA_SOURCES.names()
                                if n != "tfds")
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except ValueError:  # DatasetNotFoundError, or not even a valid name
            hint = (f"; {name!r} exists on disk: did you mean dir:{name} or npz:{name}?"
                    if os.path.exists(name) else "")
            raise DataError(f"{name!r} is neither a local form ({local_forms}) nor a "
                            f"tensorflow-datasets name{hint}") from None
        if not builder.is_prepared():
            reason = unreachable(DOWNLOAD_HOST)
            try:
                if reason:
                    raise ConnectionError(reason)
                builder.download_and_prepare()
            except Exception as error:  # offline, blocked, missing manual files, ...
                where = data_dir or "the default ~/tensorflow_datasets"
                raise DataError(
                    f"{name!r} is not prepared in {where} and could not be downloaded "
                    f"({type(error).__name__}: {error}). On a machine with internet run "
                    f"`tfds build {name} --data_dir DIR`, copy DIR here and pass "
                    f"{flag('data_dir')} DIR; or give the images as dir:PATH (one folder "
                    "per class) or npz:PATH (arrays x, y)"
                ) from error
        return builder


def unreachable(address, timeout=5.0):
    """Why (host, port) cannot be reached, or None when it can or a proxy is
    set (then only the download itself can tell). Asked before a download:
    offline, tensorflow-datasets retries ten times with backoff, about 3.5
    minutes, before it gives up."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    try:
        socket.create_connection(address, timeout=timeout).close()
    except OSError as error:
        return f"cannot reach {address[0]}: {error}"
    return None


def load_images(name, split="train", data_dir=None, image_size=None):
    """The ImageSet named `name` (see the module docstring), resized to `image_size`
    (a side length or a (height, width) pair) when it is given."""
    source, argument = _resolve(name)
    size = _size(image_size)
    data = source.load(argument, split, data_dir, size)
    if size is not None and data.images.shape[1:3] != size:
        data.images = _resize_array(data.images, size)
    return data


def load_train_and_eval(config):
    """The pretraining set and the labelled set evaluation reports on.

    The evaluation set is `config.eval_dataset` (its test split if it has one,
    else all of it), else the dataset's own test split, else a held-out
    `test_fraction` of the dataset (stratified by label, `seed`). It is resized
    to the training images' size.
    """
    test_split = None
    with _blame("dataset"):
        train = load_images(config.dataset, "train", config.data_dir, config.image_size)
        size = train.images.shape[1:3]
        if not config.eval_dataset:
            source, argument = _resolve(config.dataset)
            test_split = source.test_split(argument, config.data_dir)
        if test_split:
            evaluation = load_images(config.dataset, test_split, config.data_dir, size)
    if config.eval_dataset:
        with _blame("eval_dataset"):
            source, argument = _resolve(config.eval_dataset)
            split = source.test_split(argument, config.data_dir) or "train"
            evaluation = load_images(config.eval_dataset, split, config.data_dir, size)
    elif not test_split:
        train, evaluation = _hold_out(train, config)
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
    if evaluation.images.shape[-1] != train.images.shape[-1]:
        raise DataError(
            f"{flag('eval_dataset')}: the evaluation images have "
            f"{evaluation.images.shape[-1]} channels and the training images "
            f"{train.images.shape[-1]}; expected the same"
        )
    return train, evaluation


def pretrain_dataset(images, batch_size, views, augment, seed=None, labels=None,
                     shuffle_buffer=10_000):
    """Batches `(views, indices)` for pretraining, reshuffled every epoch, or
    `(views, indices, labels)` when `labels` are given (for the online probe).

    `views` is a tuple of `views` (1 or 2) float32 batches (B, H, W, C) in [0, 1],
    each an independent draw of `augment` on the same images; `indices` (B,)
    int32 are the images' stable dataset indices (the history buffer's keys).
    Only whole batches: an epoch is `N // batch_size` steps.

    `images` is a uint8 array (N, H, W, C), gathered and augmented a batch at
    a time in a parallel map, or a finite `tf.data.Dataset` of single images
    (uint8 in [0, 255] or floats in [0, 1]) that yields them in the same
    order every epoch: its i-th image is index i (`dataset_size` gives N).
    It is shuffled through a buffer of `shuffle_buffer` images.
    """
    if views not in (1, 2):
        raise ValueError(f"{flag('views')} {views} is not accepted; choose 1 or 2")
    if isinstance(images, tf.data.Dataset):
        if labels is not None:
            raise ValueError("labels go with an array of images; a tf.data.Dataset of "
                             "images carries none")
        return _pretrain_from_dataset(images, batch_size, views, augment, seed,
                                      shuffle_buffer)
    check_batch_size(batch_size, len(images))
    pixels = tf.convert_to_tensor(images)
    label_table = None if labels is None else tf.convert_to_tensor(labels, tf.int32)

    def make_views(indices):
        batch = tf.cast(tf.gather(pixels, indices), tf.float32) / 255.0
        element = (tuple(augment(batch) for _ in range(views)), tf.cast(indices, tf.int32))
        return element if label_table is None else element + (tf.gather(label_table, indices),)

    return shuffled_batches(len(images), batch_size, make_views, seed)


def check_batch_size(batch_size, count):
    if batch_size > count:
        raise DataError(
            f"{flag('batch_size')} {batch_size} is larger than the dataset "
            f"({count} images), so an epoch has no whole batch; accepted: 2 to {count}")


def dataset_size(dataset):
    """N, the number of images of a finite tf.data.Dataset (the history bank's rows)."""
    count = int(dataset.cardinality())
    if count < 0:
        raise DataError(
            "the tf.data.Dataset of images has an unknown or infinite size, and the "
            "history bank needs N; pass a finite dataset, or state N with "
            "dataset.apply(tf.data.experimental.assert_cardinality(N))")
    return count


def _pretrain_from_dataset(dataset, batch_size, views, augment, seed, shuffle_buffer):
    """`pretrain_dataset` for a tf.data.Dataset of single images."""
    spec = dataset.element_spec
    if not isinstance(spec, tf.TensorSpec) or spec.shape.rank != 3:
        raise DataError(f"a tf.data.Dataset for pretraining yields single images (H, W, C); "
                        f"this one yields {spec}")
    check_batch_size(batch_size, dataset_size(dataset))
    to_unit = (lambda x: tf.cast(x, tf.float32) / 255.0) if spec.dtype == tf.uint8 else (
        lambda x: tf.cast(x, tf.float32))

    def make_views(indices, batch):
        batch = to_unit(batch)
        return tuple(augment(batch) for _ in range(views)), tf.cast(indices, tf.int32)

    return (
        dataset.enumerate()
        .shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size, drop_remainder=True)
        .map(make_views, num_parallel_calls=AUTOTUNE)
        .prefetch(AUTOTUNE)
    )


def shuffled_batches(count, batch_size, make_batch, seed=None):
    """Whole batches of the row indices 0..count-1, reshuffled every epoch,
    each turned into a training batch by `make_batch` in a parallel map.
    Shuffling row indices, not images, keeps the shuffle buffer small."""
    return (
        tf.data.Dataset.range(count)
        .shuffle(count, seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size, drop_remainder=True)
        .map(make_batch, num_parallel_calls=AUTOTUNE)
        .prefetch(AUTOTUNE)
    )


def eval_dataset(images, batch_size):
    """float32 batches in [0, 1] of `images` in order, the last one possibly smaller."""
    pixels = tf.convert_to_tensor(images)
    return (
        tf.data.Dataset.range(len(images))
        .batch(batch_size)
        .map(lambda i: tf.cast(tf.gather(pixels, i), tf.float32) / 255.0, AUTOTUNE)
        .prefetch(AUTOTUNE)
    )


def _resolve(name):
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


@contextlib.contextmanager
def _blame(field):
    """Prefixes the DataErrors raised inside with the flag whose value caused them."""
    try:
        yield
    except DataError as error:
        raise DataError(f"{flag(field)} {error}") from error


def _hold_out(data, config):
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


def _size(image_size):
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)):
        return (int(image_size), int(image_size))
    return tuple(int(side) for side in image_size)


def _resize(image, size):
    """uint8 image(s) resized (bilinear, antialiased) to `size`, back to uint8."""
    resized = tf.image.resize(image, size, antialias=True)
    return tf.saturate_cast(tf.round(resized), tf.uint8)


def _resize_array(images, size, chunk=1024):
    return np.concatenate([_resize(images[i:i + chunk], size).numpy()
                           for i in range(0, len(images), chunk)])


def _image_files(folder):
    return sorted(str(p) for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _decode_files(files, size, name):
    """Decodes `files` in a parallel tf.data map, skipping those that fail.

    Returns the uint8 images (N', H, W, C) and the positions in `files` of the
    N' that decoded.
    """

    def decode(position, path):
        contents = tf.io.read_file(path)
        # JPEGs with the accurate integer IDCT, as PIL (and so the shared .npz
        # copies of CIFAR-10) decodes them; TF's default differs by about 1 level.
        image = tf.cond(
            tf.io.is_jpeg(contents),
            lambda: tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE"),
            lambda: tf.io.decode_image(contents, channels=3, expand_animations=False))
        return position, image

    decoded = (tf.data.Dataset.from_tensor_slices((tf.range(len(files)), files))
               .map(decode, AUTOTUNE)
               .ignore_errors())
    first = next(iter(decoded.take(1)), None)
    if first is None:
        raise DataError(f"{name!r}: none of its {len(files)} image files decodes "
                        f"(first: {files[0]}); expected BMP, GIF, JPEG or PNG images")
    size = size or tuple(first[1].shape[:2])
    positions, images = [], []
    batches = decoded.map(lambda p, image: (p, _resize(image, size)), AUTOTUNE).batch(256)
    for position, image in batches.as_numpy_iterator():
        positions.append(position)
        images.append(image)
    positions, images = np.concatenate(positions), np.concatenate(images)
    failed = sorted(set(range(len(files))) - set(positions.tolist()))
    if failed:
        logger.warning("%s: skipped %d of %d image files that do not decode: %s%s",
                       name, len(failed), len(files),
                       ", ".join(files[i] for i in failed[:3]),
                       ", ..." if len(failed) > 3 else "")
    if all(np.array_equal(images[..., 0], images[..., c]) for c in (1, 2)):
        images = images[..., :1]  # every image is grey
    return images, positions
