"""Schedules fitted to a run's length, which can be fitted again once traced.

Keras's CosineDecay and PolynomialDecay read `decay_steps` (and the warm-up's
`warmup_steps`) in the step, so schedules that hold them in variables follow
a new length without a new trace. A budgeted run builds its model once,
times that model's own steps, and fits every schedule to the length the
budget allows (`SimCLIC.fit_to_length`).
"""

import keras


def length_variable(steps, name):
    """A step count the traced step reads, set with `assign`."""
    return keras.Variable(int(steps), dtype="int64", trainable=False, name=name)


@keras.saving.register_keras_serializable("simclic_tf")
class RunCosineDecay(keras.optimizers.schedules.CosineDecay):
    """Keras's CosineDecay (warm-up optional) whose length `fit_to` sets."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decay_steps = length_variable(self.decay_steps, f"{self.name}_decay_steps")
        self.warmup_steps = length_variable(self.warmup_steps, f"{self.name}_warmup_steps")

    def fit_to(self, total_steps, warmup_steps=0):
        """Warms up over `warmup_steps`, then decays until `total_steps`."""
        self.warmup_steps.assign(warmup_steps)
        self.decay_steps.assign(max(total_steps - warmup_steps, 1))

    def get_config(self):
        return {**super().get_config(), "decay_steps": int(self.decay_steps.numpy()),
                "warmup_steps": int(self.warmup_steps.numpy())}


class Ramp(keras.optimizers.schedules.PolynomialDecay):
    """Linear from 0 to `end` over the first `fraction` of a run, then `end`
    (Keras's linear schedule, though what it schedules is not a learning rate)."""

    def __init__(self, end, fraction, total_steps):
        super().__init__(initial_learning_rate=0.0, end_learning_rate=end, power=1.0,
                         decay_steps=1)
        self.fraction = fraction
        self.decay_steps = length_variable(1, "ramp_steps")
        self.fit_to(total_steps)

    def fit_to(self, total_steps):
        self.decay_steps.assign(max(1, round(self.fraction * total_steps)))


class RisingToOne(RunCosineDecay):
    """From `base` at the first step up to 1 at the run's end by a cosine:
    1 - (1 - base) (cos(pi k / K) + 1) / 2, BYOL's target momentum (Grill et al. 2020)."""

    def __init__(self, base, total_steps):
        super().__init__(1.0 - base, decay_steps=max(1, total_steps))

    def __call__(self, step):
        return 1.0 - super().__call__(step)
