"""SGD with PyTorch-style parameter groups and L2 decay, as one Keras optimizer:
what pretraining (`model.build_optimizer`) and fine-tuning (`finetune`) use."""

import re

import keras
from keras import ops

from simclic_tf import compat


class ParameterGroup:
    """The variables whose `path` matches `pattern` (`re.search`) and how they
    learn: at `lr_scale` times the schedule's rate, or at a fixed
    `learning_rate` whatever the schedule (neither: the schedule's rate), with
    or without the optimizer's L2 decay. The factor or rate is held in a
    variable, `rate`, so that `set_rate` changes it after the step is traced
    (a factor derived from the run's length follows a budgeted run's length)."""

    def __init__(self, pattern, lr_scale=None, learning_rate=None, decay=True):
        if lr_scale is not None and learning_rate is not None:
            raise ValueError(f"ParameterGroup {pattern!r}: pass lr_scale or learning_rate, "
                             "not both")
        re.compile(pattern)
        self.pattern = pattern
        self.fixed = learning_rate is not None
        value = learning_rate if self.fixed else lr_scale
        self.rate = None if value is None else keras.Variable(
            float(value), dtype="float64", trainable=False, name="group_rate")
        self.decay = bool(decay)

    @property
    def lr_scale(self):
        return None if self.fixed or self.rate is None else float(self.rate.numpy())

    @property
    def learning_rate(self):
        return float(self.rate.numpy()) if self.fixed else None

    def set_rate(self, lr_scale=None, learning_rate=None):
        """Sets the fixed rate or the factor, whichever the group was built with."""
        self.rate.assign(learning_rate if self.fixed else lr_scale)

    def get_config(self):
        return {"pattern": self.pattern, "lr_scale": self.lr_scale,
                "learning_rate": self.learning_rate, "decay": self.decay}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable("simclic_tf")
class GroupedSGD(keras.optimizers.SGD):
    """SGD with momentum, L2 decay added to the gradient and parameter groups.

    `l2 * w` is added to the gradient as PyTorch SGD's `weight_decay` does
    (Keras's `weight_decay` is decoupled, another recipe). A group's gradient
    is then scaled by its factor: with v <- m v - lr g, that is exactly a
    learning rate of factor x lr for its variables, a PyTorch parameter group
    under one schedule and one step counter. A fixed rate r is the factor
    r / lr (0 while lr is 0, as at a warm-up's first step). A variable takes
    the first group that matches it; one in none learns at the schedule's
    rate, decayed. `update_step` runs after the replicas' gradients are summed
    and a `LossScaleOptimizer` has unscaled them, so the decay term needs
    neither the replica share nor the loss scale.

    Args:
      l2: the L2 coefficient (0: no decay).
      groups: `ParameterGroup`s, in order of precedence.
      The rest: as `keras.optimizers.SGD`.
    """

    def __init__(self, learning_rate=0.01, momentum=0.0, l2=0.0, groups=(), **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=momentum, **kwargs)
        self.schedule = learning_rate  # a schedule object, or a constant rate
        self.l2 = float(l2)
        self.groups = tuple(groups)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._variable_groups = tuple(
            next((g for g in self.groups if re.search(g.pattern, v.path)), None)
            for v in variables)

    def update_step(self, gradient, variable, learning_rate):
        group = self._variable_groups[compat.variable_index(self, variable)]
        gradient = ops.cast(gradient, variable.dtype)
        if self.l2 and (group is None or group.decay):
            gradient = gradient + ops.cast(self.l2, variable.dtype) * variable
        if group is not None and group.fixed:
            current = ops.cast(learning_rate, variable.dtype)
            rate = ops.cast(group.rate, variable.dtype)
            gradient = gradient * ops.where(current > 0, rate / ops.maximum(current, 1e-30), 0.0)
        elif group is not None and group.rate is not None:
            gradient = gradient * ops.cast(group.rate, variable.dtype)
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "l2": self.l2,
                "groups": [group.get_config() for group in self.groups]}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        groups = [ParameterGroup.from_config(group) for group in config.get("groups", ())]
        return super().from_config({**config, "groups": groups}, custom_objects=custom_objects)


__all__ = ["GroupedSGD", "ParameterGroup"]
