"""The one seam between simclic-tf and private TensorFlow, Keras and
keras-tuner API.

Each function below wraps one private attribute that no public API offers,
says what it is for, and raises `CompatError` naming it and the installed
versions when an upgrade removed it (tests/test_compat.py exercises each).
Nothing else in the package, its tests included, touches a leading-underscore
name of these frameworks, `keras.src`, `tensorflow.python`, or keras-tuner's
undocumented attributes.

Importing this module also imports TensorFlow with its start-up lines
filtered (below).
"""

import contextlib
import importlib
import os
import re
import sys
import tempfile

# TensorFlow 2.20+ prints these lines while loading its libraries (twice, one
# per library) before its logging honours TF_CPP_MIN_LOG_LEVEL, and, on a
# machine without a GPU, an E-level "failed call to cuInit" when it first
# looks for devices. They say nothing a user can act on; everything else
# TensorFlow prints goes through.
STARTUP_NOISE = re.compile(
    r"absl::InitializeLog\(\)|\] oneDNN custom operations are on|cudart_stub\.cc:\d+\] "
    r"Could not find cuda drivers|cpu_feature_guard\.cc:\d+\] This TensorFlow binary|"
    r"^To enable the following instructions:.*rebuild TensorFlow|"
    r"cuda_(platform|executor)\.cc:\d+\] failed call to cuInit")


@contextlib.contextmanager
def filtered_stderr(pattern):
    """Runs the block with file descriptor 2 captured, then writes back every
    line that does not match `pattern` (C++ libraries write there directly,
    past sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not pattern.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


if "tensorflow" not in sys.modules:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with filtered_stderr(STARTUP_NOISE):
        import tensorflow as tf
        # Looks for GPUs now, inside the filter, not at a command's first op.
        # (Physical devices only: logical ones can still be configured.)
        tf.config.list_physical_devices()
else:
    import tensorflow as tf

import keras  # noqa: E402


class CompatError(RuntimeError):
    """A private TensorFlow, Keras or keras-tuner API that simclic-tf relies on changed."""


def versions():
    """The installed frameworks' versions, keras-tuner's once it is imported."""
    installed = f"tensorflow {tf.__version__}, keras {keras.__version__}"
    tuner = sys.modules.get("keras_tuner")
    return installed + (f", keras-tuner {tuner.__version__}" if tuner else "")


def private(owner, name, purpose):
    """`owner.name`, or a CompatError that says what it was for."""
    try:
        return getattr(owner, name)
    except AttributeError:
        owner_name = getattr(owner, "__qualname__", type(owner).__qualname__)
        raise CompatError(
            f"simclic-tf uses {owner_name}.{name} (private API) {purpose}, and "
            f"{versions()} no longer has it; install the versions pyproject.toml "
            "names, or report it with these versions") from None


def private_module(path, purpose):
    """The module at `path` (private API), or a CompatError as `private`'s."""
    try:
        return importlib.import_module(path)
    except ImportError:
        raise CompatError(
            f"simclic-tf imports {path} (private API) {purpose}, and {versions()} no "
            "longer has it; install the versions pyproject.toml names, or report it "
            "with these versions") from None


class PrebuiltModel:
    """Mixin for a keras.Model whose layers are all built in `__init__`: it
    replaces Keras's symbolic build (`Model._maybe_symbolic_build`), which
    first reduces a distributed data batch across replicas and fails under
    MultiWorkerMirroredStrategy (it cannot convert the PerReplica batch).
    Only the optimizer is left to build."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)
        private(self, "_post_build", "to finish the build Keras's fit expects")()


def check_prebuilt_model():
    """That Keras still calls `_maybe_symbolic_build(iterator, data_batch)`
    from fit, the hook PrebuiltModel replaces."""
    hook = private(keras.Model, "_maybe_symbolic_build", "to skip the symbolic build")
    names = hook.__code__.co_varnames[:hook.__code__.co_argcount]
    if names != ("self", "iterator", "data_batch"):
        raise CompatError(f"keras.Model._maybe_symbolic_build now takes {names}; "
                          f"PrebuiltModel overrides it as (iterator, data_batch) ({versions()})")


def all_layers(model):
    """Every layer inside `model`, nested ones included, and `model` itself
    (Keras's `_flatten_layers`; `Model.layers` lists the top level only)."""
    return list(private(model, "_flatten_layers", "to reach nested BatchNorm layers")(
        include_self=True, recursive=True))


def variable_index(optimizer, variable):
    """The position of `variable` among those `optimizer` was built with
    (Keras's `_get_variable_index`): `update_step` is given the backend's
    variable, which has no Keras path, so a per-variable choice made at build
    time is found by position."""
    return private(optimizer, "_get_variable_index",
                   "to find a variable's parameter group")(variable)


def use_seed_generator(layer, generator):
    """`layer`, a Keras preprocessing layer, drawing its random seeds from
    `generator`. No public argument takes a generator: these layers read
    `layer.generator` through `_get_seed_generator` (keras.src's DataLayer
    contract), which this checks still holds."""
    seed_generator = private(layer, "_get_seed_generator",
                             "to give a preprocessing layer its seed generator")
    layer.generator = generator
    if seed_generator() is not generator:
        raise CompatError(f"{type(layer).__name__}._get_seed_generator no longer returns "
                          f"layer.generator, which simclic-tf sets ({versions()})")
    return layer


def tf_variable(variable):
    """The `tf.Variable` behind a keras.Variable (TensorFlow backend), for the
    kernels that update it in place; `.value` may be an autocast copy."""
    inner = private(variable, "_value", "to update a Keras variable in place")
    return variable.value if inner is None else inner  # None: built lazily.


def on_this_replica(distributed):
    """This replica's component of a distributed variable (its own copy of an
    ON_READ variable), inside a replica context."""
    return private(distributed, "_get_on_device_or_primary",
                   "to update this replica's copy of the history bank")()


def in_multi_worker_mode(strategy):
    """Whether a MultiWorkerMirroredStrategy spans several workers."""
    return private(strategy.extended, "_in_multi_worker_mode",
                   "to tell one worker from several")()


def in_xla_context():
    """Whether the op being built goes into an XLA cluster (a jit-compiled
    function, or one nested in it)."""
    purpose = "to pick the kernels' XLA path"
    check = private(private_module("tensorflow.python.ops.control_flow_util", purpose),
                    "GraphOrParentsInXlaContext", purpose)
    return check(tf.compat.v1.get_default_graph())


def in_stateless_scope():
    """Whether Keras is tracing under a StatelessScope (where variables cannot
    be updated in place)."""
    purpose = "to refuse in-place updates where Keras cannot see them"
    scope = private_module("keras.src.backend.common.stateless_scope", purpose)
    return private(scope, "in_stateless_scope", purpose)()


def started_trials(oracle):
    """Every trial a keras_tuner.Oracle has started, in start order (its
    undocumented `trials` and `start_order`; the public `get_best_trials`
    lists completed trials only)."""
    purpose = "to list the trials of a search"
    trials = private(oracle, "trials", purpose)
    return [trials[trial_id] for trial_id in private(oracle, "start_order", purpose)]


def has_running_trials(oracle):
    """Whether a keras_tuner.Oracle has a trial running (its undocumented
    `ongoing_trials`)."""
    return bool(private(oracle, "ongoing_trials", "to tell a finished search from a busy one"))
