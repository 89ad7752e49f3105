"""The SimCLIC Siamese network as a `keras.Model` with its own train_step,
so that pretraining is `model.compile(optimizer)` then `model.fit(data)`.

The data are `(views, indices)`: a tuple of one or two augmented batches of
the same images, and the images' stable dataset indices (the history buffer
is keyed by them).
"""

import collections

import keras
import tensorflow as tf
from keras import ops

from simclic_tf import compat, distribute
from simclic_tf.backbones import build_backbone, copy_model
from simclic_tf.config import ConfigError, SimCLICConfig, flag
from simclic_tf.heads import build_projector
from simclic_tf.losses import build_distance
from simclic_tf.optimizers import GroupedSGD, ParameterGroup
from simclic_tf.registry import PERTURBATIONS, PREDICTORS
from simclic_tf.schedules import Ramp, RisingToOne, RunCosineDecay


Objective = collections.namedtuple("Objective", ["loss", "z", "features"])
Objective.__doc__ = "The SimCLIC loss, the first view's z and its backbone features."


def collapse_std(z):
    """Std over the batch of the l2-normalised z, averaged over dimensions:
    about 1/sqrt(dim) when healthy, 0 when every image maps to one point.
    Under tf.distribute, over the global batch (all replicas' rows)."""
    return distribute.global_batch_std(z)


def effective_rank(z):
    """How many directions a batch of z spans, as a fraction of the most it
    could (min(batch, dim)): the exponential of the entropy of its centred
    singular values (Roy & Vetterli 2007; RankMe, Garrido et al. 2023).
    z_std cannot see the dimensional collapse of SimSiam without
    stop-gradient, since z's last BatchNorm holds every dimension's batch
    variance at 1; the rank does. Per replica under tf.distribute."""
    z = ops.cast(z, "float32")
    z = z - ops.mean(z, axis=0, keepdims=True)
    singular = tf.linalg.svd(z, compute_uv=False)
    share = singular / ops.maximum(ops.sum(singular), 1e-12)
    entropy = -ops.sum(share * ops.log(ops.maximum(share, 1e-12)))
    return ops.exp(entropy) / ops.cast(ops.minimum(ops.shape(z)[0], ops.shape(z)[1]), "float32")


@keras.saving.register_keras_serializable("simclic_tf")
class SimCLIC(compat.PrebuiltModel, keras.Model):
    """Encoder f (backbone + projector), predictor h and perturbation P.

    Args:
      config: a `SimCLICConfig` (or its dict), the single source of knobs.
      image_shape: (height, width, channels) of the input images.
      num_samples: dataset size N, the number of history buffer rows.
      num_classes: label count, needed by `config.online_probe` only.
      backbone: a `keras.Model` from images to features (B, D) to use instead
        of `config.backbone`'s registry entry.

    With `online_probe`, the data are `(views, indices, labels)` and a linear
    classifier learns from the first view's backbone features behind a
    stop-gradient: it watches the encoder without steering it.

    With `target_momentum` (BYOL), `target_backbone` and `target_projector`
    give the target branch's z: frozen copies of the online ones, moved
    towards them after each step (`update_target`).
    """

    def __init__(self, config, image_shape, num_samples, num_classes=None, backbone=None,
                 **kwargs):
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = SimCLICConfig.from_dict(config)
        # Values derived from the run's length, kept so that `fit_to_length` derives them again.
        self.config, self.derived = config.for_budget(config.epoch_steps(int(num_samples)))
        config = self.config
        self.image_shape = tuple(image_shape)
        self.num_samples = int(num_samples)
        self.num_classes = num_classes
        self.custom_backbone = backbone is not None
        # A smaller second view needs a backbone open to any height and width.
        backbone_shape = ((None, None, self.image_shape[-1]) if config.second_view_size
                          else self.image_shape)
        self.backbone = backbone if self.custom_backbone else build_backbone(
            config.backbone, backbone_shape, config.width, config.bn_momentum,
            config.zero_init_residual)
        if config.second_view_size and None not in self.backbone.input_shape[1:3]:
            raise ConfigError(
                f"--second-view-size {config.second_view_size}: the backbone "
                f"{self.backbone.name} takes only {self.backbone.input_shape[1:3]} images; "
                "give one whose input is keras.Input((None, None, channels))")
        if len(self.backbone.output.shape) != 2:
            raise ConfigError(f"the backbone must map images to feature vectors (B, D); "
                              f"{self.backbone.name} returns {self.backbone.output.shape}: "
                              "end it with a pooling layer such as GlobalAveragePooling2D")
        self.projector = build_projector(self.backbone.output.shape[-1], config.proj_dim,
                                         config.bn_momentum)
        self.predictor = PREDICTORS.get(config.predictor)(config.proj_dim, config.pred_hidden)
        self.perturbation = PERTURBATIONS.get(config.perturbation).from_run_config(
            config, self.num_samples)
        self.distance = build_distance(config)
        self.run_steps = config.epochs * config.epoch_steps(self.num_samples)
        self.strength_schedule = strength_schedule(config, self.perturbation, self.run_steps)
        self.momentum_schedule = None
        if config.target_momentum:
            self.target_backbone = frozen_copy(self.backbone, "target_backbone")
            self.target_projector = frozen_copy(self.projector, "target_projector")
            self.momentum_schedule = RisingToOne(config.target_momentum, self.run_steps)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.z_std_tracker = keras.metrics.Mean(name="z_std")
        self.z_rank_tracker = keras.metrics.Mean(name="z_rank")
        self.probe = None
        if config.online_probe:
            if not num_classes:
                raise ConfigError(f"{flag('online_probe')} needs labels; the training "
                                  "set has none (pass a labelled --dataset)")
            self.probe = keras.layers.Dense(num_classes, name="online_probe")
            self.probe.build((None, self.backbone.output.shape[-1]))
            self.probe_accuracy = keras.metrics.SparseCategoricalAccuracy(
                name="online_probe_accuracy")
        if config.sync_bn:
            distribute.synchronize_batch_norm(self)
        self.built = True

    def call(self, images, training=False):
        """Backbone features: what downstream tasks and kNN use."""
        return self.backbone(images, training=training)

    def encode(self, images, training=False):
        """z = f(x): backbone then projector."""
        return self.projector(self.backbone(images, training=training), training=training)

    def compute_objective(self, views, indices, training=False):
        """The SimCLIC loss of docs/DESIGN.md section 1 and the first view's z.

        With views=2: D(p1, sg(t2)) / 2 + D(p2, sg(t1)) / 2; with views=1:
        D(p, sg(t)). `perturb="online"` moves P before the predictor and
        takes the unperturbed z as the target. With a target encoder (BYOL),
        the target branch's z are its own.
        """
        features = [self.backbone(view, training=training) for view in views]
        zs = tuple(self.projector(f, training=training) for f in features)
        target_zs = zs
        if self.momentum_schedule is not None:
            target_zs = tuple(self.target_projector(self.target_backbone(view, training=training),
                                                    training=training) for view in views)
        if self.config.perturb == "target":
            online, targets = zs, self.perturbation(target_zs, indices, training=training)
        else:
            online, targets = self.perturbation(zs, indices, training=training), target_zs
        predictions = [self.predictor(z, training=training) for z in online]
        if self.config.stop_gradient:
            targets = [ops.stop_gradient(t) for t in targets]
        if len(views) == 1:
            loss = self.distance(predictions[0], targets[0])
        else:
            loss = (self.distance(predictions[0], targets[1])
                    + self.distance(predictions[1], targets[0])) / 2
        return Objective(loss, zs[0], features[0])

    def _probe_loss(self, features, labels):
        """The online probe's cross-entropy on stop-gradient features (0 without a probe)."""
        if self.probe is None:
            return 0.0
        logits = ops.cast(self.probe(ops.stop_gradient(features)), "float32")  # mixed policies
        self.probe_accuracy.update_state(labels, logits)
        return ops.mean(keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True))

    def train_step(self, data):
        views, indices, *labels = data
        if self.strength_schedule is not None:
            self.perturbation.mix.assign(self.strength_schedule(self.optimizer.iterations))
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            loss, z, features = self.compute_objective(views, indices, training=True)
            total = loss + (self._probe_loss(features, labels[0]) if labels else 0.0)
            # Replicas' gradients are summed by the optimizer: each takes its
            # share of the global-batch mean; then the (float16) loss scale.
            replicas = self.distribute_strategy.num_replicas_in_sync
            scaled = self.optimizer.scale_loss(total / replicas)
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(gradients, variables))
        if self.momentum_schedule is not None:
            self.update_target(self.momentum_schedule(self.optimizer.iterations - 1))
        return self._update_metrics(loss, z)

    def fit_to_length(self, epochs, steps_per_epoch, total_steps=None):
        """Fits the schedules, built for any length, to `epochs` epochs of
        `steps_per_epoch` steps, or to `total_steps` within them (a budgeted
        run may end within its last epoch): the learning rate's warm-up and
        cosine, a predictor rate derived from the length (not one given), the
        strength ramp and BYOL's momentum, all read by the traced step from
        variables. A budgeted run so times this model's own steps before it
        knows its length, and fits it to its pace as it goes; `config` (and
        so `get_config`) says the epochs, `run_steps` the steps."""
        self.run_steps = total_steps or epochs * steps_per_epoch
        config = self.config.replace(epochs=epochs, steps_per_epoch=steps_per_epoch,
                                     **dict.fromkeys(self.derived))
        self.config, self.derived = config.for_budget(steps_per_epoch, self.run_steps)
        for schedule in (self.strength_schedule, self.momentum_schedule):
            if schedule is not None:
                schedule.fit_to(self.run_steps)
        fit_optimizer(self.optimizer, self.config, steps_per_epoch, self.run_steps)

    def update_target(self, tau):
        """BYOL's step t <- tau t + (1 - tau) o for each weight o of the
        online backbone and projector that the optimizer trains and its
        target copy t. Every replica moves its own copy from the same
        values, so the copies stay identical without a collective."""
        pairs = zip(self.backbone.weights + self.projector.weights,
                    self.target_backbone.weights + self.target_projector.weights)
        for online, target in pairs:
            if online.trainable:
                target.assign(tau * target + (1 - tau) * online)

    def test_step(self, data):
        views, indices, *labels = data
        loss, z, features = self.compute_objective(views, indices, training=False)
        if labels:
            self._probe_loss(features, labels[0])
        return self._update_metrics(loss, z)

    def _update_metrics(self, loss, z):
        self.loss_tracker.update_state(loss)
        self.z_std_tracker.update_state(collapse_std(z))
        self.z_rank_tracker.update_state(effective_rank(z))
        logs = {metric.name: metric.result() for metric in self.metrics}
        if self.perturbation.rampable:
            logs["mix"] = ops.convert_to_tensor(self.perturbation.mix)
        if distribute.is_multi_worker(self.distribute_strategy):
            # Keras reduces step logs across workers with a MEAN over axis 0,
            # which fails on scalars: give them that axis.
            logs = {name: ops.reshape(value, (1,)) for name, value in logs.items()}
        return logs

    @property
    def metrics(self):
        probe = [self.probe_accuracy] if self.probe is not None else []
        return [self.loss_tracker, self.z_std_tracker, self.z_rank_tracker] + probe

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict(),
                "image_shape": list(self.image_shape), "num_samples": self.num_samples,
                "num_classes": self.num_classes,
                "backbone": (keras.saving.serialize_keras_object(self.backbone)
                             if self.custom_backbone else None)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("backbone") is not None:
            config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


def strength_schedule(config, perturbation, total_steps):
    """The history mix a as a function of the optimizer's step, or None for a
    constant strength: with `strength_ramp` r, linear from 0 (SimSiam's
    target) to the perturbation's strength over the first r * `total_steps`
    steps, then constant; a curriculum from the current view to the old one.
    Computed in `train_step`, so `model.fit` alone ramps, and a resumed run
    ramps on from its restored step."""
    if not config.strength_ramp:
        return None
    return Ramp(perturbation.strength, config.strength_ramp, total_steps)


def frozen_copy(model, name):
    """BYOL's target network: a copy of `model` holding its weights (their
    paths start with `name`), none of them trainable. Its layers stay
    trainable, so that its BatchNorms use batch statistics in training, as
    BYOL's target does."""
    with keras.name_scope(name):
        copy = copy_model(model)
    for weight in copy.weights:
        weight.trainable = False
    return copy


# SimCLIC's predictor and probe are top-level layers: their variables' paths
# start with their names (a backbone's "my_predictor_head" is no match).
PREDICTOR_GROUP, PROBE_GROUP = "^predictor/", "^online_probe/"


def build_optimizer(config, steps_per_epoch):
    """SGD with momentum and cosine decay (linear warm-up optional), the
    learning rate scaled with the batch size, L2 decay added to the gradient
    as PyTorch's; the predictor at `pred_lr_scale` times the encoder's rate
    (fixed at that times the peak rate if `fix_pred_lr`), the online probe at
    a fixed `online_probe_lr` without decay. `pred_lr_scale`, if None, is
    derived from the run's length as the model does (`config.for_budget`);
    `fit_optimizer` fits all of it to another length."""
    config, _ = config.for_budget(steps_per_epoch)
    schedule = RunCosineDecay(
        initial_learning_rate=0.0 if config.warmup_epochs else config.learning_rate,
        decay_steps=1, warmup_target=config.learning_rate if config.warmup_epochs else None)
    predictor = (ParameterGroup(PREDICTOR_GROUP, learning_rate=predictor_rate(config))
                 if config.fix_pred_lr else
                 ParameterGroup(PREDICTOR_GROUP, lr_scale=config.pred_lr_scale))
    probe = ParameterGroup(PROBE_GROUP, learning_rate=config.online_probe_lr, decay=False)
    optimizer = GroupedSGD(learning_rate=schedule, momentum=config.momentum,
                           l2=config.weight_decay, groups=[predictor, probe])
    fit_optimizer(optimizer, config, steps_per_epoch)
    return optimizer


def fit_optimizer(optimizer, config, steps_per_epoch, total_steps=None):
    """Fits `optimizer` (a `build_optimizer`'s, or a LossScaleOptimizer around
    one) to `config.epochs` epochs of `steps_per_epoch` steps, or `total_steps`
    within them: the warm-up, the cosine, and the predictor's rate when
    derived from the length."""
    config, _ = config.for_budget(steps_per_epoch, total_steps)
    sgd = getattr(optimizer, "inner_optimizer", optimizer)
    sgd.schedule.fit_to(total_steps or config.epochs * steps_per_epoch,
                        config.warmup_epochs * steps_per_epoch)
    predictor = next(group for group in sgd.groups if group.pattern == PREDICTOR_GROUP)
    predictor.set_rate(lr_scale=config.pred_lr_scale, learning_rate=predictor_rate(config))


def predictor_rate(config):
    """The predictor's fixed rate under `fix_pred_lr`: its factor times the peak rate."""
    return config.pred_lr_scale * config.learning_rate
