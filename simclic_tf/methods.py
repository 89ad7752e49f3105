"""Rival methods as configurations of the one SimCLIC model (`--method`).

A method is a class of knobs: `fixed`, those that define it (a config of the
method that sets another value is refused, naming both flags), and `recipe`,
its published CIFAR recipe's knobs where this library has them, a starting
point that any flag overrides. The architecture (backbone, SimSiam's projector
and predictor) and the optimiser stay the run's, so that rows of a comparison
differ in the objective alone. `SimCLICConfig.for_method` applies them.
"""

from simclic_tf.knobs import ConfigError, flag
from simclic_tf.registry import METHODS


class Method:
    """Base class: no knob fixed, none suggested."""

    fixed = {}
    recipe = {}

    @classmethod
    def knobs(cls):
        """{knob: value} that `--method` sets: the recipe's, then the fixed ones."""
        return {**cls.recipe, **cls.fixed}

    @classmethod
    def check(cls, config):
        """Raises ConfigError, naming both flags, where `config` contradicts a
        knob that defines the method."""
        for name, value in cls.fixed.items():
            if getattr(config, name) != value:
                raise ConfigError(
                    f"--method {config.method} and {flag(name)} {getattr(config, name)} "
                    f"contradict: {config.method} fixes {flag(name)} {value}; drop "
                    f"{flag(name)}, or choose --method simclic to combine knobs freely")


@METHODS.register("simclic")
class SimCLIC(Method):
    """SimCLIC (Yang and Li, JSSI 2023): the library's defaults, every knob free."""


@METHODS.register("simsiam")
class SimSiam(Method):
    """SimSiam (Chen and He, CVPR 2021): the target is z itself, behind a
    stop-gradient, from the online weights. Its ablations (no predictor,
    no stop-gradient, cross-entropy) remain knobs."""

    fixed = {"perturbation": "none", "target_momentum": 0.0}


@METHODS.register("byol")
class BYOL(Method):
    """BYOL (Grill et al., NeurIPS 2020): the target z come from a momentum
    encoder, an exponential moving average of the online backbone and
    projector, tau from 0.99 (solo-learn's CIFAR recipe) rising to 1 by a
    cosine. What defines it is a momentum above 0; the target's perturbation
    is free, so a SimCLIC perturbation of the EMA target is a `--perturbation`
    away."""

    recipe = {"perturbation": "none", "target_momentum": 0.99}

    @classmethod
    def check(cls, config):
        super().check(config)
        if not config.target_momentum:
            raise ConfigError(
                f"--method {config.method} and --target-momentum 0 contradict: BYOL's target "
                "is a momentum encoder; give --target-momentum above 0 (0.99 is its recipe)")


@METHODS.register("simclr")
class SimCLR(Method):
    """SimCLR (Chen et al., ICML 2020): NT-Xent over the 2N views of the
    global batch, the other images as negatives, no predictor and gradients
    through both branches. Temperature 0.2, solo-learn's CIFAR value: on
    our validation split it beat the 0.5 of SimCLR's appendix B.9 by 4.6 kNN
    points at SimSiam's 390-step time (docs/benchmarks.md)."""

    fixed = {"perturbation": "none", "predictor": "none", "loss": "nt_xent",
             "stop_gradient": False, "target_momentum": 0.0}
    recipe = {"temperature": 0.2}


@METHODS.register("nnsiam")
class NNSiam(Method):
    """NNSiam: SimSiam whose target is z's nearest neighbour in a support
    queue of past projections, NNCLR's idea (Dwibedi et al., ICCV 2021) on
    SimSiam, as solo-learn's nnsiam. Queue 8,192 rather than solo-learn's
    65,536: under one epoch of a 10k-image CIFAR subset (65,536 would hold
    each image six times over, stale copies of one epoch after another), and
    still 64 global batches of 128 to draw neighbours from."""

    fixed = {"perturbation": "nearest_neighbour", "target_momentum": 0.0}
    recipe = {"queue_size": 8192}
