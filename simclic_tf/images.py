"""Image sets with stable indices: N images of one shape, image i always at
index i, held in memory or read from disk when a batch asks for them.

Every set has labels (int64, in memory: 8 bytes an image) or none, class
names, `subset` and `stratified_split` (by label, rows kept in order), and
two ways of reading pixels inside tf.data, so that no pipeline holds more
than a few batches of decoded images:
- `read(index_batches, batch_size)`: a dataset of int64 index batches (B,)
  becomes `(indices, uint8 pixels (B, H, W, C))`, in parallel; sets with
  `random_access` (memory, image files, a memory-mapped array);
- `stream()`: the images in index order, one at a time; every set, and the
  only way for those read front to back (tensorflow-datasets' TFRecords, a
  user's tf.data.Dataset).
`batches(batch_size)` gives them in order for feature extraction.
"""

import copy
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow as tf
from sklearn.model_selection import train_test_split

AUTOTUNE = tf.data.AUTOTUNE
# How the files ImageFiles reads begin: BMP, GIF, JPEG and PNG.
SIGNATURES = (b"BM", b"GIF8", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


class Images:
    """The interface. `storage` names where the pixels live, for logs and reports."""

    storage = ""
    random_access = True
    dtype = tf.uint8  # A user's tf.data.Dataset may yield floats in [0, 1].

    def __init__(self, labels, class_names):
        self.labels = labels
        self.class_names = list(class_names)

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def nbytes(self):
        """The size of the set decoded: what holding it in memory would take."""
        return len(self) * int(np.prod(self.image_shape))

    def __len__(self):
        raise NotImplementedError

    def subset(self, positions):
        """The images at `positions` (ints), indexed 0..len(positions)-1."""
        part = copy.copy(self)
        part.labels = None if self.labels is None else self.labels[positions]
        part._take(np.asarray(positions, np.int64))
        return part

    def _take(self, positions):
        raise NotImplementedError

    def resized(self, size):
        """This set with its images resized to `size`, (height, width), when read."""
        resized = copy.copy(self)
        resized.image_shape = (*size, self.image_shape[2])
        return resized

    def stratified_split(self, held_out, seed):
        """(rest, held out), stratified by label and seeded, rows kept in order;
        `held_out` is a fraction, or a count of images. Raises scikit-learn's
        ValueError when a class is too small."""
        rest, chosen = train_test_split(np.arange(len(self)), test_size=held_out,
                                        random_state=seed, stratify=self.labels)
        return self.subset(np.sort(rest)), self.subset(np.sort(chosen))

    def sample(self, count, seed):
        """`count` of these images, stratified by label and seeded, in order."""
        return self.stratified_split(count, seed)[1]

    def read(self, index_batches, batch_size):
        """`(indices, uint8 pixels)` for each int64 index batch of `index_batches`
        (of `batch_size` indices, the last one possibly fewer)."""
        raise NotImplementedError

    def stream(self):
        """The uint8 images in index order (a dataset of single images)."""
        return self.batches(256).unbatch()

    def batches(self, batch_size):
        """uint8 batches of the images in index order, the last one possibly
        smaller; an error at the end when fewer than N came (a file that did
        not decode), never features that miss their labels."""
        if self.random_access:
            indices = tf.data.Dataset.range(len(self)).batch(batch_size)
            images = self.read(indices, batch_size).map(lambda indices, pixels: pixels).unbatch()
        else:
            images = self.stream()
        return images.apply(tf.data.experimental.assert_cardinality(len(self))).batch(batch_size)

    def head(self, count):
        """The first `count` images, as a uint8 array."""
        return next(self.stream().batch(count).as_numpy_iterator())

    def undecodable(self):
        """The positions of the images that cannot be read: none, but for files."""
        return np.empty(0, np.int64)


class ImageSet(Images):
    """Images in memory: uint8 (N, H, W, C), int64 labels (N,) or None if unlabeled.

    Fastest to read; the array becomes one tensor that the pipelines gather from."""

    storage = "memory"

    def __init__(self, images, labels, class_names):
        super().__init__(labels, class_names)
        self.images = images
        self._tensor = None

    @property
    def image_shape(self):
        return self.images.shape[1:]

    def __len__(self):
        return len(self.images)

    def _take(self, positions):
        self.images = self.images[positions]
        self._tensor = None

    def resized(self, size, chunk=1024):
        pixels = np.concatenate([resize(self.images[i:i + chunk], size).numpy()
                                 for i in range(0, len(self), chunk)])
        return ImageSet(pixels, self.labels, self.class_names)

    def tensor(self):
        """The images as one tensor, made once: every pipeline gathers from
        the same copy (TensorFlow copies an array it converts)."""
        if self._tensor is None:
            self._tensor = tf.convert_to_tensor(self.images)
        return self._tensor

    def read(self, index_batches, batch_size):
        pixels = self.tensor()
        return index_batches.map(lambda indices: (indices, tf.gather(pixels, indices)),
                                 num_parallel_calls=AUTOTUNE)

    def stream(self):
        return tf.data.Dataset.from_tensor_slices(self.images)

    def head(self, count):
        return self.images[:count]


class ImageFiles(Images):
    """Image files decoded when read: BMP, GIF, JPEG or PNG, as RGB (C = 3) or
    grey (C = 1), resized to (height, width) when they differ.

    A file that does not decode is skipped (`ignore_errors`): in pretraining
    its index is not visited and the batch that held it is one image short;
    `batches` (evaluation, whose features must match the labels) then ends
    with an error. `undecodable` finds such files before a run."""

    storage = "files"

    def __init__(self, paths, labels, class_names, image_shape):
        super().__init__(labels, class_names)
        self.image_shape = tuple(image_shape)
        self.paths = np.asarray(paths, dtype=object)

    def __len__(self):
        return len(self.paths)

    def _take(self, positions):
        self.paths = self.paths[positions]

    def decode(self, path):
        """The uint8 image in `path`, at this set's size and channels."""
        size, channels = self.image_shape[:2], self.image_shape[2]
        contents = tf.io.read_file(path)
        # JPEGs with the accurate integer IDCT, as PIL (and so the shared .npz
        # copies of CIFAR-10) decodes them; TF's default differs by about 1 level.
        image = tf.cond(
            tf.io.is_jpeg(contents),
            lambda: tf.io.decode_jpeg(contents, channels=channels,
                                      dct_method="INTEGER_ACCURATE"),
            lambda: tf.io.decode_image(contents, channels=channels, expand_animations=False))
        image.set_shape((None, None, channels))
        return fit(image, size)

    def read(self, index_batches, batch_size):
        paths = tf.constant(self.paths.astype(str))

        def read_batch(indices):
            # A dataset per batch: a file that does not decode shortens its own
            # batch. Regrouped across batches, a skipped file moved every later
            # batch's bounds (and replicas' slices), and once a batch's worth
            # had been skipped the pipeline ended short of its stated length.
            return (tf.data.Dataset.from_tensor_slices(indices)
                    .map(lambda i: (i, self.decode(tf.gather(paths, i))), AUTOTUNE)
                    .ignore_errors()
                    .batch(batch_size))

        return (index_batches
                .interleave(read_batch, num_parallel_calls=AUTOTUNE, deterministic=True)
                .map(lambda i, image: (i, tf.ensure_shape(image, (None, *self.image_shape)))))

    def undecodable(self):
        """The positions of the files that do not decode, found without
        decoding the set: only a file that is empty or does not begin as a
        BMP, GIF, JPEG or PNG does is decoded, to be sure. The trade-off: 8
        bytes read a file, but a file with a sound header and corrupt data
        passes (pretraining then skips it; evaluation ends in an error)."""
        with ThreadPoolExecutor(16) as pool:  # I/O bound: many files at once.
            sound = list(pool.map(has_image_signature, self.paths))
        suspects = np.flatnonzero(np.logical_not(sound))
        return np.array([i for i in suspects if not decodes(self.paths[i])], np.int64)


class MappedArray(Images):
    """The uint8 array `x` of an uncompressed .npz, memory-mapped: read a batch
    at a time by NumPy, so that only the pages a batch touches are loaded."""

    storage = "memmap"

    def __init__(self, array, labels, class_names, positions=None):
        super().__init__(labels, class_names)
        self.image_shape = array.shape[1:]
        self.array = array
        self.positions = np.arange(len(array)) if positions is None else positions

    def __len__(self):
        return len(self.positions)

    def _take(self, positions):
        self.positions = self.positions[positions]

    def read(self, index_batches, batch_size):
        stored = self.array.shape[1:]

        def gather(indices):
            rows = self.positions[indices]
            order = np.argsort(rows)  # Ascending reads, for the page cache.
            pixels = np.empty((len(rows), *stored), np.uint8)
            pixels[order] = self.array[rows[order]]
            return pixels

        def read_batch(indices):
            pixels = tf.numpy_function(gather, [indices], tf.uint8, stateful=False)
            pixels = tf.ensure_shape(pixels, (None, *stored))
            if stored != self.image_shape:
                pixels = resize(pixels, self.image_shape[:2])
            return indices, pixels

        return index_batches.map(read_batch, num_parallel_calls=AUTOTUNE)


class ImageStream(Images):
    """Images that can only be read front to back: `make_dataset()` gives
    them, (H, W, C) of `dtype` (uint8, or floats in [0, 1]), in the same order
    every time; the i-th is index i."""

    storage = "stream"
    random_access = False

    def __init__(self, make_dataset, count, labels, class_names, image_shape,
                 dtype=tf.uint8):
        super().__init__(labels, class_names)
        self.image_shape = tuple(image_shape)
        self.dtype = dtype
        self.make_dataset = make_dataset
        self.count = int(count)
        self.positions = None  # All of them; else the sorted ones kept.

    def __len__(self):
        return self.count if self.positions is None else len(self.positions)

    def _take(self, positions):
        if np.any(np.diff(positions) <= 0):
            raise ValueError("a streamed image set keeps a subset in its own order only")
        if self.positions is not None:
            positions = self.positions[positions]
        self.positions = positions

    def stream(self):
        images = self.make_dataset()
        if tuple(images.element_spec.shape[:2]) != self.image_shape[:2]:  # Varying or other.
            images = images.map(lambda image: fit(image, self.image_shape[:2]), AUTOTUNE)
        if self.positions is None:
            return images
        keep = np.zeros(self.count, bool)
        keep[self.positions] = True
        keep = tf.constant(keep)
        return (images.enumerate().filter(lambda i, image: tf.gather(keep, i))
                .map(lambda i, image: image))


def memory_map_npz(path, key="x"):
    """The array `key` of the .npz at `path` as a read-only np.memmap, or None
    when it cannot be mapped (compressed with np.savez_compressed, or an object
    array): an .npz is a zip, and np.savez stores each .npy in it as is."""
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(key + ".npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with archive.open(info) as member:
            read_header = (np.lib.format.read_array_header_1_0
                           if np.lib.format.read_magic(member) == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(member)
            header = member.tell()
    if fortran or dtype.hasobject:
        return None
    with open(path, "rb") as f:  # The member's data follow its local file header.
        f.seek(info.header_offset)
        local = f.read(30)
        offset = (info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                  + int.from_bytes(local[28:30], "little") + header)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def has_image_signature(path):
    """Whether the file at `path` begins as an image in `SIGNATURES` does."""
    try:
        with open(path, "rb") as file:
            return file.read(8).startswith(SIGNATURES)
    except OSError:
        return False


def decodes(path):
    """Whether the file at `path` decodes as an image."""
    try:
        tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
    except tf.errors.OpError:
        return False
    return True


def resize(image, size):
    """uint8 image(s) resized (bilinear, antialiased) to `size`, back to uint8."""
    resized = tf.image.resize(image, size, antialias=True)
    return tf.saturate_cast(tf.round(resized), tf.uint8)


def fit(image, size):
    """uint8 `image` at `size`, resized only when its own size differs."""
    return tf.cond(tf.reduce_all(tf.shape(image)[:2] == size),
                   lambda: image, lambda: resize(image, size))

