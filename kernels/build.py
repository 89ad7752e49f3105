"""Compile the C++ custom ops (`kernels/cc/*.cc`) against the installed
TensorFlow on first use, cache the shared library, and load it.

Nothing prebuilt is shipped: the sources are package data and `load()` runs
the C++ compiler once per (TensorFlow version, sources, compiler, flags),
typically one to two minutes, then every later process loads the cached file.

* Compiler: `$SIMCLIC_TF_CXX`, else `$CXX`, else `g++` (C++17).
* Flags: `tf.sysconfig.get_compile_flags()` / `get_link_flags()`, plus the
  include folders `external/highwayhash` and `external/farmhash_archive/src`
  under TensorFlow's include dir (the XLA headers need them) and
  `libtensorflow_cc.so.2` (the XLA builder and tf2xla symbols).
* Cache: `$SIMCLIC_TF_KERNEL_CACHE`, else `$XDG_CACHE_HOME/simclic_tf/kernels`,
  else `~/.cache/simclic_tf/kernels`; the library is
  `<cache>/<tf version>/<hash>/simclic_ops.so`, where the hash covers the
  sources, the compiler and every flag. Concurrent builds (several processes
  starting at once) serialise on a file lock in that folder; the library is
  written to a temporary name and renamed, so a reader never sees half a file.
  Delete the folder to force a rebuild.

Loading late: TensorFlow creates the XLA kernels of every registered op once
per process (`XlaOpRegistry::RegisterCompilationKernels`), when the eager
context starts (the first op run) or at the first XLA compile, whichever comes
first; an op library loaded after that point would have no XLA kernels, and
any jit-compiled function using its ops would fail. `load()` therefore calls
the library's `SimclicRegisterXlaKernels()` after `tf.load_op_library`: it
registers the two XLA kernels on every XLA backend itself when that collection
has already run (the usual case), and does nothing otherwise, since TensorFlow
will then pick them up. Both orders are tested in fresh processes.
"""

import ctypes
import fcntl
import hashlib
import logging
import os
import pathlib
import shlex
import subprocess
import threading

import tensorflow as tf

__all__ = ["BuildError", "cache_dir", "library_path", "load", "SOURCES"]

logger = logging.getLogger(__name__)

SOURCE_DIR = pathlib.Path(__file__).resolve().parent / "cc"
SOURCES = ("simclic_ops.cc",)
LIBRARY_NAME = "simclic_ops.so"
ENV_CXX = "SIMCLIC_TF_CXX"
ENV_CACHE = "SIMCLIC_TF_KERNEL_CACHE"
BUILD_TIMEOUT_S = 1800


class BuildError(RuntimeError):
    """The custom ops could not be compiled or loaded for this TensorFlow."""


def compiler():
    """The C++ compiler command: $SIMCLIC_TF_CXX, else $CXX, else g++."""
    return os.environ.get(ENV_CXX) or os.environ.get("CXX") or "g++"


def cache_root():
    if os.environ.get(ENV_CACHE):
        return pathlib.Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return pathlib.Path(base).expanduser() / "simclic_tf" / "kernels"


def _flags():
    include = tf.sysconfig.get_include()
    compile_flags = [
        "-shared", "-fPIC", "-O2", "-DNDEBUG", "-w",
        # The arithmetic must round exactly as specified (kernels/custom_op.py):
        # no implicit multiply-add contraction; the kernels ask for fma where
        # the specification has one.
        "-ffp-contract=off",
        *tf.sysconfig.get_compile_flags(),
        f"-I{include}/external/highwayhash",
        f"-I{include}/external/farmhash_archive/src",
    ]
    link_flags = [*tf.sysconfig.get_link_flags(), f"-L{tf.sysconfig.get_lib()}",
                  "-l:libtensorflow_cc.so.2"]
    return compile_flags, link_flags


def _sources():
    return [SOURCE_DIR / name for name in SOURCES]


def _key(cxx):
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    compile_flags, link_flags = _flags()
    digest.update("\0".join([cxx, *compile_flags, *link_flags]).encode())
    return digest.hexdigest()[:16]


def cache_dir(cxx=None):
    """The folder that holds (or will hold) the library for this setup."""
    return cache_root() / tf.__version__ / _key(cxx or compiler())


def library_path(cxx=None):
    return cache_dir(cxx) / LIBRARY_NAME


def _compile(cxx, output):
    compile_flags, link_flags = _flags()
    command = [*shlex.split(cxx), *map(str, _sources()), *compile_flags,
               "-o", str(output), *link_flags]
    logger.info("kernels: compiling the simclic custom ops for TensorFlow %s "
                "(first use; about a minute): %s", tf.__version__, cxx)
    try:
        result = subprocess.run(command, capture_output=True, text=True,
                                timeout=BUILD_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(f"cannot run the C++ compiler {cxx!r} ({error}); set "
                         f"${ENV_CXX} to a C++17 compiler") from error
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-20:])
        raise BuildError(f"compiling {SOURCE_DIR} with {cxx!r} failed "
                         f"(exit {result.returncode}):\n{tail}")


def build(cxx=None):
    """The path of the compiled library, compiling it if it is not cached."""
    cxx = cxx or compiler()
    try:
        folder = cache_dir(cxx)
        library = folder / LIBRARY_NAME
        if library.exists():
            return library
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # Another process may be building.
            if library.exists():
                return library
            partial = folder / f"{LIBRARY_NAME}.{os.getpid()}.tmp"
            try:
                _compile(cxx, partial)
                os.replace(partial, library)
            finally:
                if partial.exists():
                    partial.unlink()
        return library
    except OSError as error:
        raise BuildError(f"cannot build the custom ops in {cache_root()}: {error}; "
                         f"set ${ENV_CACHE} to a writable folder") from error


_lock = threading.Lock()
_loaded = {}  # library path -> (op module, number of late XLA registrations)
_by_compiler = {}  # compiler -> op module (the fast path of every later call)
_failed = {}  # compiler -> BuildError


def load(cxx=None):
    """The loaded op module (`simclic_history_exchange`, ...).

    Raises `BuildError` when the library cannot be built or loaded; the error
    is remembered, so a process tries (and fails) at most once per compiler.
    """
    cxx = cxx or compiler()
    module = _by_compiler.get(cxx)
    if module is not None:
        return module
    with _lock:
        if cxx in _failed:
            raise _failed[cxx]
        try:
            path = str(build(cxx))
            if path not in _loaded:
                module = tf.load_op_library(path)
                late = ctypes.CDLL(path).SimclicRegisterXlaKernels()
                _loaded[path] = (module, late)
                if late:
                    logger.info("kernels: registered %d XLA kernels of the custom ops "
                                "(loaded after the first XLA compilation)", late)
            _by_compiler[cxx] = _loaded[path][0]
            return _by_compiler[cxx]
        except BuildError as error:
            _failed[cxx] = error
            raise
        except Exception as error:  # tf.errors.NotFoundError, OSError, ...
            _failed[cxx] = BuildError(f"cannot load the compiled custom ops: {error}")
            raise _failed[cxx] from error


def late_xla_registrations():
    """How many XLA kernels the loaded library registered itself (tests)."""
    return sum(late for _, late in _loaded.values())
