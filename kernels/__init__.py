"""Compute kernels of simclic-tf: the history-buffer exchange and the
representation noise, each XLA-compiled behind a plain Python signature (a C++
custom op can later replace a kernel without changing callers). Numpy
references for the tests live in `kernels.reference`."""

from kernels.history import history_exchange
from kernels.noise import representation_noise

__all__ = ["history_exchange", "representation_noise"]
