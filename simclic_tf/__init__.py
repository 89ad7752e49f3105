"""simclic-tf: SimCLIC self-supervised representation learning in Keras."""

import os

# The design card keeps kernels/ and tuning/ at the top of the repository;
# the installed distribution holds them as simclic_tf.kernels and
# simclic_tf.tuning (pyproject.toml's package-dir). Run from a checkout, this
# package finds them beside it.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if (os.path.isfile(os.path.join(_checkout, "pyproject.toml"))
        and not os.path.isdir(os.path.join(__path__[0], "kernels"))):
    __path__.append(_checkout)

from simclic_tf import compat  # noqa: E402 (quiets TensorFlow's start-up lines)
from simclic_tf import (  # noqa: E402,F401 (registries)
    backbones, file_sources, heads, losses, methods, perturbations)
from simclic_tf.config import ConfigError, SimCLICConfig  # noqa: E402
from simclic_tf.model import SimCLIC, build_optimizer  # noqa: E402
from simclic_tf.training import build_pretraining  # noqa: E402

__version__ = "0.3.0"
__all__ = ["ConfigError", "SimCLIC", "SimCLICConfig", "build_optimizer", "build_pretraining"]
