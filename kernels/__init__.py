"""Compute kernels of simclic-tf: the history-buffer exchange and the
representation noise, in two implementations with one specification:

* `tf`: XLA-compiled TensorFlow functions (`kernels.history`, `kernels.noise`);
* `custom_op`: C++ custom ops with a CPU kernel and an XLA lowering
  (`kernels.custom_op`, sources in `kernels/cc/`), compiled from source on
  first use by `kernels.build` and cached per TensorFlow version.

`select(kernel_impl)` returns the pair of functions to call; nothing else in
the library needs to know which one runs. `history_exchange` and
`representation_noise` at this level are the `tf` implementation. Numpy
references for the tests live in `kernels.reference`.
"""

import collections
import logging
import threading

from simclic_tf.config import field_choices
from simclic_tf.kernels.history import history_exchange
from simclic_tf.kernels.noise import representation_noise

__all__ = ["IMPLEMENTATIONS", "Kernels", "history_exchange", "representation_noise",
           "select"]

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = field_choices("kernel_impl")  # --kernel-impl's, declared in the config

Kernels = collections.namedtuple("Kernels", ["name", "history_exchange", "representation_noise"])
Kernels.__doc__ = "One implementation of the kernels: `name` is 'custom_op' or 'tf'."

TF_KERNELS = Kernels("tf", history_exchange, representation_noise)

_lock = threading.Lock()
_warned = set()


def _custom_op_kernels():
    from simclic_tf.kernels import custom_op

    custom_op.ops()  # Compiles (first use) and loads, or raises BuildError.
    return Kernels("custom_op", custom_op.history_exchange, custom_op.representation_noise)


def select(kernel_impl="auto"):
    """The kernels to run for a `kernel_impl` of 'auto', 'custom_op' or 'tf'.

    'custom_op' raises `kernels.build.BuildError` (with the compiler's message)
    if the C++ ops cannot be built or loaded for this TensorFlow. 'auto' takes
    the custom ops when they build and load, else the TensorFlow functions,
    saying so in one warning per process and reason.
    """
    if kernel_impl not in IMPLEMENTATIONS:
        raise ValueError(f"kernel_impl {kernel_impl!r} is not accepted; choose one of: "
                         f"{', '.join(IMPLEMENTATIONS)}")
    if kernel_impl == "tf":
        return TF_KERNELS
    if kernel_impl == "custom_op":
        return _custom_op_kernels()
    from simclic_tf.kernels.build import BuildError

    try:
        return _custom_op_kernels()
    except BuildError as error:
        reason = str(error).splitlines()[0]
        with _lock:
            if reason not in _warned:
                _warned.add(reason)
                logger.warning("kernel_impl=auto: the C++ custom ops are unavailable (%s); "
                               "using the TensorFlow-function kernels", reason)
        return TF_KERNELS
