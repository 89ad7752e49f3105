"""The sources read from disk: `npz:PATH`, `dir:PATH` and tensorflow-datasets
names, registered in `simclic_tf.sources.DATA_SOURCES` when this module is
imported (as the package does)."""

import os
import socket
import zipfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from simclic_tf.config import flag
from simclic_tf.images import ImageFiles, ImageSet, ImageStream, MappedArray, memory_map_npz
from simclic_tf.sources import DATA_SOURCES, DataError, DataSource

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
AUTOTUNE = tf.data.AUTOTUNE
# tensorflow-datasets' mirror, which it tries first for every download.
DOWNLOAD_HOST = ("storage.googleapis.com", 443)
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


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
                found = {key: arrays[key] for key in ("y", "class_names") if key in arrays.files}
                if "x" in arrays.files:  # Mapped, or read whole when compressed.
                    found["x"] = memory_map_npz(path)
                    if found["x"] is None:
                        found["x"] = arrays["x"]
        except (OSError, ValueError, AttributeError, zipfile.BadZipFile) as error:
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
        def image_set(labels, class_names):
            if isinstance(images, np.memmap):
                return MappedArray(images, labels, class_names)
            return ImageSet(images, labels, class_names)

        if "y" not in found:
            return image_set(None, [])
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
        return image_set(labels.astype(np.int64), class_names)


@DATA_SOURCES.register("dir")
class Directory(DataSource):
    """A folder of images: one subfolder per class, or the images directly (unlabeled).

    As Keras's `image_dataset_from_directory`: every subfolder is a class, class
    index = position in the sorted folder names, and with subfolders present
    files directly in PATH are ignored. Images (by extension: BMP, GIF, JPEG,
    PNG, searched recursively) are decoded when read, in a parallel tf.data
    map, with the channels (grey or RGB) and, unless `size` is given, the size
    of the first image that decodes (sorted order). A file that does not
    decode is left out of a training set, and of any set held in memory, with
    one warning; a streamed evaluation set that holds one is refused
    (`simclic_tf.sources.load_train_and_eval`). A folder where nothing
    decodes is an error.
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
        return ImageFiles(files, labels, class_names, _first_image_shape(files, size, name))


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
        # One pass over the prepared files, images left undecoded: N and the labels.
        import tensorflow_datasets as tfds

        labelled = "label" in features
        try:
            undecoded = builder.as_dataset(split=split, shuffle_files=False,
                                           decoders={"image": tfds.decode.SkipDecoding()})
        except (ValueError, KeyError) as error:
            raise DataError(f"{name!r} has no split {split!r} ({error}); its splits: "
                            f"{', '.join(builder.info.splits) or 'unknown'}") from None
        labels = np.fromiter(undecoded.map(
            lambda example: example["label"] if labelled else tf.constant(-1, tf.int64),
            AUTOTUNE).as_numpy_iterator(), np.int64)
        if not len(labels):
            raise DataError(f"{name!r}: split {split!r} is empty")
        count, labels, class_names = len(labels), (labels if labelled else None), []
        if labelled:
            class_names = list(getattr(features["label"], "names", None)
                               or [str(i) for i in range(labels.max() + 1)])
        height, width, channels = features["image"].shape
        shape = (*(size or (height, width)), channels)

        def read():  # ImageStream.stream resizes what comes at another size.
            examples = builder.as_dataset(split=split, shuffle_files=False)
            return examples.map(lambda example: example["image"], AUTOTUNE)

        return ImageStream(read, count, labels, class_names, shape)

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


def _image_files(folder):
    return sorted(str(p) for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _first_image_shape(files, size, name):
    """(height, width, channels) of the first of `files` that decodes (height
    and width from `size` when given), reading no more files than it must."""
    def probe(path):
        image = tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
        return tf.shape(image)

    shapes = tf.data.Dataset.from_tensor_slices(files).map(probe).ignore_errors()
    first = next(iter(shapes.take(1)), None)
    if first is None:
        raise DataError(f"{name!r}: none of its {len(files)} image files decodes "
                        f"(first: {files[0]}); expected BMP, GIF, JPEG or PNG images")
    height, width, channels = first.numpy().tolist()
    return (*(size or (height, width)), 1 if channels in (1, 2) else 3)
