"""simclic-tf: SimCLIC self-supervised representation learning in Keras."""

from simclic_tf import backbones, heads, losses, perturbations  # noqa: F401 (registries)
from simclic_tf.config import ConfigError, SimCLICConfig
from simclic_tf.model import SimCLIC, build_optimizer

__version__ = "0.1.0"
__all__ = ["ConfigError", "SimCLIC", "SimCLICConfig", "build_optimizer"]
