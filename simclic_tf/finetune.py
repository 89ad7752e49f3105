"""Fine-tuning evaluation (docs/DESIGN.md section 2): the whole network, backbone
and a new linear head, trained with labels; reports the test accuracy (the
caller turns it into the error rate the paper reports).

The recipe, SimSiam/BYOL-style but milder on a small budget:
- a copy of the backbone (the one passed in is never modified) and a new
  Dense head on its pooled features;
- SGD with momentum 0.9, cosine decay, L2 weight decay added to the gradient
  (as PyTorch's SGD, like pretraining);
- the head at peak learning rate 0.1 (batch 128), the backbone at a lower
  one, 0.1 x the head's by default;
- augmentation on, milder than pretraining's: random resized crop with scale
  0.5 to 1 and a horizontal flip, no colour jitter, grayscale or blur.

`FineTuneConfig` holds these numbers. The two learning rates are parameter
groups of one `GroupedSGD` (`finetune_optimizer`): the backbone's variables
at `backbone_lr_scale` times the head's rate, one schedule and one step counter.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from simclic_tf.augment import RandomResizedCrop, parallel_safe
from simclic_tf.backbones import copy_model
from simclic_tf.pipelines import eval_dataset, shuffled_batches
from simclic_tf.knobs import Knobs, knob
from simclic_tf.optimizers import GroupedSGD, ParameterGroup

HEAD = "head"  # the head layer's name: its variables' paths start "head/"


@dataclasses.dataclass(frozen=True)
class FineTuneConfig(Knobs):
    """The fine-tuning recipe (module docstring), checked as the config's knobs are."""

    learning_rate: float = knob(
        0.1, "the head's peak learning rate (cosine decay to 0 over the run)",
        range=(0.0, 100.0))
    backbone_lr_scale: float = knob(
        0.1, "the backbone's learning rate as a multiple of the head's", range=(0.0, 1000.0))
    momentum: float = knob(0.9, "SGD momentum", range=(0.0, 0.999))
    weight_decay: float = knob(
        5e-4, "L2 weight decay added to the gradient, as PyTorch SGD does", range=(0.0, 1.0))
    batch_size: int = knob(128, "batch size, capped at the number of images",
                           range=(1, 1 << 20))
    crop_min_scale: float = knob(
        0.5, "smallest area of the random resized crop, as a fraction of the image "
        "(milder than pretraining's 0.2)", range=(0.01, 1.0))
    flip: bool = knob(True, "random horizontal flips")


@keras.saving.register_keras_serializable("simclic_tf")
class FineTuner(keras.Model):
    """`backbone` then a Dense head to `num_classes` logits, trained end to end
    by Keras's own train_step; compile it with `finetune_optimizer` for the
    backbone's lower learning rate and the L2 decay.

    Args:
      backbone: a Keras model from images to pooled features; trained in place,
        so pass a copy if the original must stay as it is (`finetune` does).
      num_classes: size of the head.
      seed: initialiser seed of the head.
    """

    def __init__(self, backbone, num_classes, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.head = keras.layers.Dense(
            self.num_classes, kernel_initializer=keras.initializers.GlorotUniform(seed),
            name=HEAD)
        self.head.build((None, backbone.output.shape[-1]))
        self.built = True

    def call(self, images, training=False):
        """Class logits."""
        return self.head(self.backbone(images, training=training))

    def get_config(self):
        return {
            **super().get_config(),
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


def finetune_optimizer(learning_rate, recipe=FineTuneConfig()):
    """The `GroupedSGD` of a `FineTuner`: the head at `learning_rate` (a float
    or a schedule), every other variable (the backbone's) at the FineTuneConfig
    `recipe`'s `backbone_lr_scale` times it, with its momentum and L2 decay."""
    backbone = ParameterGroup(f"^(?!{HEAD}/)", lr_scale=recipe.backbone_lr_scale)
    return GroupedSGD(learning_rate, momentum=recipe.momentum, l2=recipe.weight_decay,
                      groups=[backbone])


def finetune_augmentation(image_size, recipe=FineTuneConfig(), seed=None):
    """The FineTuneConfig `recipe`'s random resized crop (area from its
    `crop_min_scale` to 1) and, if its `flip`, a horizontal flip, for float32
    batches in [0, 1]: milder than the pretraining augmentation."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    layers = [RandomResizedCrop(height, width, scale=(recipe.crop_min_scale, 1.0), seed=seed,
                                dtype="float32")]
    if recipe.flip:
        layers.append(parallel_safe(keras.layers.RandomFlip(
            "horizontal", seed=None if seed is None else seed + 1, dtype="float32")))
    return keras.Sequential(layers, name="finetune_augmentation")


def labelled_batches(images, batch_size, augment=None, seed=None):
    """Shuffled whole batches `(float32 images in [0, 1], labels)` of the
    labelled image set `images`, augmented batch-wise in a parallel map when
    `augment` is given."""
    targets = tf.convert_to_tensor(np.asarray(images.labels, np.int64))

    def make_batch(indices, pixels):
        batch = tf.cast(pixels, tf.float32) / 255.0
        if augment is not None:
            batch = augment(batch, training=True)
        return batch, tf.gather(targets, indices)

    return shuffled_batches(images, batch_size, make_batch, seed)


def finetune(backbone, train_set, epochs, recipe=FineTuneConfig(), num_classes=None, seed=0,
             verbose=0):
    """A `FineTuner` on a copy of `backbone`, trained on the labelled ImageSet
    `train_set` (uint8 images of the backbone's input shape) for `epochs` with
    the FineTuneConfig `recipe`.

    The head's rate decays from the recipe's `learning_rate` to 0 over the run
    (cosine); the backbone's is `backbone_lr_scale` times it. Batches are
    whole: the recipe's `batch_size` is capped at the number of images.
    """
    if train_set.labels is None:
        raise ValueError("fine-tuning needs labels; the training set has none")
    keras.utils.set_random_seed(seed)
    batch_size = min(recipe.batch_size, len(train_set))
    steps_per_epoch = len(train_set) // batch_size
    model = FineTuner(copy_model(backbone), num_classes or train_set.num_classes, seed=seed)
    schedule = keras.optimizers.schedules.CosineDecay(
        recipe.learning_rate, max(1, epochs * steps_per_epoch))
    model.compile(optimizer=finetune_optimizer(schedule, recipe),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    augment = finetune_augmentation(train_set.image_shape[:2], recipe, seed)
    batches = labelled_batches(train_set, batch_size, augment, seed)
    model.fit(batches, epochs=epochs, verbose=verbose, shuffle=False)
    return model


def predict_classes(model, images, batch_size=256):
    """Argmax predictions of a classifier on uint8 images (an image set or an
    array), in inference mode."""
    logits = model.predict(eval_dataset(images, batch_size), verbose=0)
    return np.argmax(logits, axis=-1)


def finetune_accuracy(backbone, train_set, test_set, epochs, **kwargs):
    """Test accuracy of `backbone` fine-tuned on `train_set` (see `finetune`,
    which takes the keyword arguments); `backbone` itself is left unchanged."""
    num_classes = max(train_set.num_classes, int(np.max(test_set.labels)) + 1)
    model = finetune(backbone, train_set, epochs, num_classes=num_classes, **kwargs)
    return float(np.mean(predict_classes(model, test_set) == test_set.labels))


__all__ = ["FineTuneConfig", "FineTuner", "copy_model", "finetune", "finetune_accuracy",
           "finetune_augmentation", "finetune_optimizer", "labelled_batches",
           "predict_classes"]
