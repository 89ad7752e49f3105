"""The SimCLIC Siamese network as a `keras.Model` with its own train_step,
so that pretraining is `model.compile(optimizer)` then `model.fit(data)`.

The data are `(views, indices)`: a tuple of one or two augmented batches of
the same images, and the images' stable dataset indices (the history buffer
is keyed by them).
"""

import keras
import tensorflow as tf
from keras import ops

from simclic_tf.backbones import build_backbone
from simclic_tf.config import SimCLICConfig
from simclic_tf.heads import build_projector
from simclic_tf.registry import LOSSES, PERTURBATIONS, PREDICTORS


def collapse_std(z):
    """Std over the batch of the l2-normalised z, averaged over dimensions:
    about 1/sqrt(dim) when healthy, 0 when every image maps to one point."""
    z = ops.normalize(ops.cast(z, "float32"), axis=-1)
    return ops.mean(ops.std(z, axis=0))


@keras.saving.register_keras_serializable("simclic_tf")
class SimCLIC(keras.Model):
    """Encoder f (backbone + projector), predictor h and perturbation P.

    Args:
      config: a `SimCLICConfig` (or its dict), the single source of knobs.
      image_shape: (height, width, channels) of the input images.
      num_samples: dataset size N, the number of history buffer rows.
    """

    def __init__(self, config, image_shape, num_samples, **kwargs):
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = SimCLICConfig.from_dict(config)
        self.config = config
        self.image_shape = tuple(image_shape)
        self.num_samples = int(num_samples)
        self.backbone = build_backbone(config.backbone, self.image_shape, config.width,
                                       config.bn_momentum)
        self.projector = build_projector(self.backbone.output.shape[-1], config.proj_dim,
                                         config.bn_momentum)
        self.predictor = PREDICTORS.get(config.predictor)(config.proj_dim, config.pred_hidden)
        self.perturbation = PERTURBATIONS.get(config.perturbation).from_run_config(
            config, self.num_samples)
        self.distance = LOSSES.get(config.loss)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.z_std_tracker = keras.metrics.Mean(name="z_std")
        self.built = True

    def call(self, images, training=False):
        """Backbone features: what downstream tasks and kNN use."""
        return self.backbone(images, training=training)

    def encode(self, images, training=False):
        """z = f(x): backbone then projector."""
        return self.projector(self.backbone(images, training=training), training=training)

    def compute_objective(self, views, indices, training=False):
        """The SimCLIC loss of DESIGN.md section 1 and the first view's z.

        With views=2: D(p1, sg(t2)) / 2 + D(p2, sg(t1)) / 2; with views=1:
        D(p, sg(t)). `perturb="online"` moves P before the predictor and
        takes the unperturbed z as the target.
        """
        zs = tuple(self.encode(view, training=training) for view in views)
        perturbed = self.perturbation(zs, indices, training=training)
        online, targets = (zs, perturbed) if self.config.perturb == "target" else (perturbed, zs)
        predictions = [self.predictor(z, training=training) for z in online]
        if self.config.stop_gradient:
            targets = [ops.stop_gradient(t) for t in targets]
        if len(views) == 1:
            loss = self.distance(predictions[0], targets[0])
        else:
            loss = (self.distance(predictions[0], targets[1])
                    + self.distance(predictions[1], targets[0])) / 2
        return loss, zs[0]

    def train_step(self, data):
        views, indices = data
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            loss, z = self.compute_objective(views, indices, training=True)
        gradients = tape.gradient(loss, variables)
        # L2 on every weight added to the gradient, as PyTorch SGD's weight_decay
        # (Keras optimizers' own weight_decay is decoupled, a different recipe).
        decay = self.config.weight_decay
        gradients = [g + decay * ops.cast(v, g.dtype) for g, v in zip(gradients, variables)]
        self.optimizer.apply_gradients(zip(gradients, variables))
        return self._update_metrics(loss, z)

    def test_step(self, data):
        views, indices = data
        loss, z = self.compute_objective(views, indices, training=False)
        return self._update_metrics(loss, z)

    def _update_metrics(self, loss, z):
        self.loss_tracker.update_state(loss)
        self.z_std_tracker.update_state(collapse_std(z))
        return {"loss": self.loss_tracker.result(), "z_std": self.z_std_tracker.result()}

    @property
    def metrics(self):
        return [self.loss_tracker, self.z_std_tracker]

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict(),
                "image_shape": list(self.image_shape), "num_samples": self.num_samples}


def build_optimizer(config, steps_per_epoch):
    """SGD with momentum and cosine decay (linear warm-up optional), the
    learning rate scaled with the batch size."""
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = config.warmup_epochs * steps_per_epoch
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else config.learning_rate,
        decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=config.learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )
    return keras.optimizers.SGD(learning_rate=schedule, momentum=config.momentum)
