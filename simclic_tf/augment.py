"""SimSiam's augmentation recipe as Keras layers that run batched in tf.data.

Every layer takes and returns float32 batches `(B, H, W, C)` in [0, 1], draws
its random parameters per image, and advances its seed generator on every call,
so two views of one batch, and every epoch, see different draws.

Keras preprocessing layers do the flip and the colour work. Their factors do
not mean what torchvision's do, so `build_augmentation` converts the recipe's
numbers (SimSiam's, in torchvision terms); see the comments there. Two
differences remain: Keras jitters brightness, contrast, saturation and hue in
that fixed order (torchvision in a random order), and Keras's Gaussian blur
draws one sigma per batch and axis (torchvision one per image).
"""

import math
import random

import keras
import tensorflow as tf

from simclic_tf import compat

# SimSiam's CIFAR recipe, in torchvision's terms (ColorJitter(0.4, 0.4, 0.4, 0.1)).
CROP_SCALE = (0.2, 1.0)
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
JITTER_P = 0.8
GRAYSCALE_P = 0.2
BLUR_P = 0.5
BLUR_SIGMA = (0.1, 2.0)
BLUR_MIN_SIZE = 96  # blur is for ImageNet-like resolutions only
# Seeds one augmentation takes from its seed on (one per layer): a second
# augmentation seeded this far on draws apart from the first.
SEEDS_PER_AUGMENTATION = 6


class ParallelSafeSeedGenerator(keras.random.SeedGenerator):
    """A `SeedGenerator` that gives distinct seeds to concurrent calls.

    Keras's reads its state variable, then writes it back advanced: two batches
    that a parallel tf.data map augments at the same time can read the same
    state and get the same random draws (seen in practice: whole batches with
    identical crops). `tf.random.Generator.make_seeds` reads and advances its
    state in one locked op.
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(seed, **kwargs)
        with tf.device("CPU:0"):  # tf.data runs on the host
            self.generator = tf.random.Generator.from_seed(
                random.randint(1, 10**9) if seed is None else seed)

    def next(self, ordered=True):
        return self.generator.make_seeds(1)[:, 0]


def parallel_safe(layer):
    """`layer`, a Keras preprocessing layer, drawing from a ParallelSafeSeedGenerator
    seeded with its `seed`. The swap is not serialised: a reloaded model has
    Keras's generators again."""
    return compat.use_seed_generator(layer, ParallelSafeSeedGenerator(layer.seed))


@keras.saving.register_keras_serializable(package="simclic_tf")
class RandomResizedCrop(keras.layers.Layer):
    """Crops a random area and aspect ratio of each image, resized to (height, width).

    Keras has no RandomResizedCrop, so this is torchvision's, batched: each
    image gets its own box (area fraction uniform in `scale`, aspect ratio
    log-uniform in `ratio`, clipped to the image) and one
    `tf.image.crop_and_resize` call crops and resizes the whole batch.

    Args:
        height, width: output size.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's width / height.
        seed: optional integer for reproducible draws.
    """

    def __init__(self, height, width, scale=CROP_SCALE, ratio=(3 / 4, 4 / 3),
                 seed=None, **kwargs):
        super().__init__(**kwargs)
        self.height = height
        self.width = width
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.seed = seed
        self.seed_generator = ParallelSafeSeedGenerator(seed)

    def call(self, images, training=True):
        images = tf.convert_to_tensor(images, self.compute_dtype)
        if not training:
            return tf.image.resize(images, (self.height, self.width))
        shape = tf.shape(images)
        batch = shape[0]
        in_height = tf.cast(shape[1], "float32")
        in_width = tf.cast(shape[2], "float32")
        area = keras.random.uniform(
            (batch,), *self.scale, seed=self.seed_generator)
        log_ratio = keras.random.uniform(
            (batch,), math.log(self.ratio[0]), math.log(self.ratio[1]),
            seed=self.seed_generator)
        ratio = tf.exp(log_ratio)
        # Box side as a fraction of the image side, for a box whose pixel area
        # is `area * H * W` and whose pixel aspect ratio w / h is `ratio`.
        box_height = tf.minimum(tf.sqrt(area / ratio * in_width / in_height), 1.0)
        box_width = tf.minimum(tf.sqrt(area * ratio * in_height / in_width), 1.0)
        offset = keras.random.uniform((batch, 2), seed=self.seed_generator)
        top = offset[:, 0] * (1.0 - box_height)
        left = offset[:, 1] * (1.0 - box_width)
        boxes = tf.stack(
            [top, left, top + box_height, left + box_width], axis=1)
        return tf.image.crop_and_resize(
            images, boxes, tf.range(batch), (self.height, self.width))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.height, self.width, input_shape[-1])

    def get_config(self):
        return {
            **super().get_config(),
            "height": self.height,
            "width": self.width,
            "scale": self.scale,
            "ratio": self.ratio,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="simclic_tf")
class RandomApply(keras.layers.Layer):
    """Applies `layer` to each image of the batch with probability `p`.

    Keras colour jitter has no probability of its own. The wrapped layer runs
    on the whole batch and a per-image coin picks its output or the input, so
    the cost is one batched call whatever `p` is.
    """

    def __init__(self, layer, p=0.5, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomApply p={p} is not a probability in [0, 1]")
        self.layer = layer
        self.p = p
        self.seed = seed
        self.seed_generator = ParallelSafeSeedGenerator(seed)

    def call(self, images, training=True):
        images = tf.convert_to_tensor(images, self.compute_dtype)
        if not training:
            return images
        changed = tf.cast(self.layer(images, training=True), images.dtype)
        coin = keras.random.uniform(
            tf.shape(images)[:1], seed=self.seed_generator)
        apply = tf.reshape(coin < self.p, (-1, 1, 1, 1))
        return tf.where(apply, changed, images)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "layer": keras.saving.serialize_keras_object(self.layer),
            "p": self.p,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"])
        return cls(**config)


def build_augmentation(image_size, channels, blur=None, crop_scale=CROP_SCALE, seed=None):
    """SimSiam's augmentation T for float32 batches in [0, 1].

    Random resized crop (area fraction in `crop_scale`, SimSiam's 0.2 to 1)
    to `image_size`, horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.1) with
    p 0.8, grayscale with p 0.2, and Gaussian blur (sigma 0.1 to 2) with p 0.5
    when `blur` is on; `blur=None` turns it on from `image_size` 96
    (ImageNet-like) up, as SimSiam uses it only there. Single-channel images
    keep the crop, flip, brightness and contrast, and skip saturation, hue and
    grayscale, which need RGB.

    Args:
        image_size: output side length, or an `(height, width)` pair.
        channels: 1 or 3, the channels of the images it will see.
        blur: True, False, or None for the resolution rule above.
        crop_scale: (min, max) area fraction of the crop.
        seed: optional integer; layer k draws from seed + k, so that the
            layers' draws are not correlated.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: the recipe takes 1 (grey) or 3 (RGB)")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if blur is None:
        blur = min(height, width) >= BLUR_MIN_SIZE
    seeds = [None if seed is None else seed + k for k in range(SEEDS_PER_AUGMENTATION)]
    # float32 even under a mixed-precision policy: this runs in tf.data.
    dtype = "float32"
    jitter = dict(
        # Keras brightness is additive (x + d), torchvision's multiplicative
        # (x * b, b in [1 - 0.4, 1 + 0.4]): at mid-grey 0.5 that is d in +-0.2.
        brightness_factor=JITTER["brightness"] / 2,
        # Contrast factor in [1 - 0.4, 1 + 0.4] about the mean, as torchvision;
        # a pair, since Keras reads a single float f as [1, 1 + f].
        contrast_factor=(JITTER["contrast"], JITTER["contrast"]),
    )
    if channels == 3:
        low, high = 1 - JITTER["saturation"], 1 + JITTER["saturation"]
        # Keras multiplies saturation by f / (1 - f) for f drawn in the range;
        # torchvision's multiplier is in [0.6, 1.4]: f = m / (1 + m).
        jitter["saturation_factor"] = (low / (1 + low), high / (1 + high))
        # Keras shifts hue by up to +-f / 2 of the circle, torchvision by +-f.
        jitter["hue_factor"] = 2 * JITTER["hue"]
    layers = [
        keras.Input((None, None, channels)),
        RandomResizedCrop(height, width, crop_scale, seed=seeds[0], dtype=dtype),
        parallel_safe(keras.layers.RandomFlip("horizontal", seed=seeds[1], dtype=dtype)),
        RandomApply(
            parallel_safe(keras.layers.RandomColorJitter(
                value_range=(0, 1), seed=seeds[2], dtype=dtype, **jitter)),
            p=JITTER_P, seed=seeds[3], dtype=dtype),
    ]
    if channels == 3:
        layers.append(parallel_safe(
            keras.layers.RandomGrayscale(GRAYSCALE_P, seed=seeds[4], dtype=dtype)))
    if blur:
        # Kernel about 10 % of the image side (23 at 224), as SimSiam and BYOL.
        kernel = max(3, int(0.1 * min(height, width)) // 2 * 2 + 1)
        layers.append(parallel_safe(keras.layers.RandomGaussianBlur(
            # factor (p, p): Keras draws the blur probability from this range.
            factor=(BLUR_P, BLUR_P), kernel_size=kernel, sigma=BLUR_SIGMA,
            value_range=(0, 1), seed=seeds[5], dtype=dtype)))
    return keras.Sequential(layers, name="simsiam_augmentation")
