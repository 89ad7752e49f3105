"""Scale: the tf.distribute strategy, mixed precision, cross-replica
BatchNorm, and the collectives over the global batch (docs/DESIGN.md
section 5). How the replicas hold the history buffer: simclic_tf/history_bank.py.
"""

import json
import logging
import os

import keras
import tensorflow as tf
from keras import ops

from simclic_tf import compat
from simclic_tf.config import ConfigError, checked_value, flag

logger = logging.getLogger(__name__)


def make_strategy(name="auto"):
    """The tf.distribute strategy `--strategy NAME` asks for.

    auto: MirroredStrategy when several GPUs are visible, else the default
    (one device). multi_worker: MultiWorkerMirroredStrategy with the cluster
    of the TF_CONFIG environment variable (one worker without it); create it
    before any other TensorFlow work in the process. tpu: TPUStrategy over
    the TPU that TPUClusterResolver finds (TPU_NAME, or a local TPU VM).
    """
    # A SimCLICConfig is accepted too; a name is checked as its knob.
    name = checked_value("strategy", getattr(name, "strategy", name))
    if name == "auto":
        name = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if not cluster_config():
            logger.warning("--strategy multi_worker without TF_CONFIG: one worker")
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        raise ConfigError(
            f"{flag('strategy')} tpu: no TPU found ({str(error).splitlines()[0]}); set "
            "TPU_NAME or run on a TPU VM, or choose --strategy auto, default, mirrored "
            "or multi_worker") from None
    return tf.distribute.TPUStrategy(resolver)


def cluster_config():
    """The TF_CONFIG environment variable, parsed ({} when it is unset)."""
    if "TF_CONFIG" not in os.environ:
        return {}
    try:
        return json.loads(os.environ["TF_CONFIG"])
    except ValueError as error:
        raise ConfigError(f"TF_CONFIG is not JSON ({error}); see --strategy multi_worker "
                          "in the README's Scale section") from None


def worker_subdir():
    """"" for the chief of the TF_CONFIG cluster (task "chief", else worker 0)
    or without a cluster; "<type>_<index>" for every other task. Every worker
    runs the same callbacks, export and report, so the others write theirs
    into that subdirectory of the run directory instead of over the chief's
    (Keras's advice for checkpoints under MultiWorkerMirroredStrategy)."""
    config = cluster_config()
    task = config.get("task", {})
    kind, index = task.get("type"), task.get("index", 0)
    if kind in (None, "chief") or (kind == "worker" and index == 0
                                   and "chief" not in config.get("cluster", {})):
        return ""
    return f"{kind}_{index}"


def set_precision(name):
    """`keras.mixed_precision.set_global_policy` for `--precision NAME`
    (layers built afterwards compute in float16 / bfloat16 and keep float32
    weights; the loss, normalisations, z_std and history math stay float32);
    auto: the policy `pick_precision` picks."""
    name = checked_value("precision", getattr(name, "precision", name))
    keras.mixed_precision.set_global_policy(pick_precision()[0] if name == "auto" else name)


# CPU flags of native bfloat16 arithmetic, which oneDNN's bfloat16 kernels use
# (AVX-512 BF16's dot products, AMX's tiles).
BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# GPUs compute bfloat16 natively from compute capability 8.0 (Ampere) on.
BFLOAT16_GPU_CAPABILITY = (8, 0)


def pick_precision():
    """(policy, why) of `--precision auto`: mixed_bfloat16 where the devices
    that compute compute bfloat16 natively (every visible GPU of capability
    8.0 or more; else the CPU, with AVX-512 BF16 or AMX), float32 elsewhere,
    where bfloat16 would be emulated and slower."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capabilities = [tuple(tf.config.experimental.get_device_details(gpu).get(
            "compute_capability", (0, 0))) for gpu in gpus]
        oldest = ".".join(map(str, min(capabilities)))
        if min(capabilities) >= BFLOAT16_GPU_CAPABILITY:
            return "mixed_bfloat16", f"the GPUs compute bfloat16 natively (capability {oldest})"
        return "float32", f"a GPU of capability {oldest} has no native bfloat16 (8.0 or more)"
    native = sorted(set(BFLOAT16_CPU_FLAGS) & cpu_flags())
    if native:
        return "mixed_bfloat16", f"the CPU computes bfloat16 natively ({', '.join(native)})"
    return "float32", (f"the CPU has no native bfloat16 (none of the flags "
                       f"{', '.join(BFLOAT16_CPU_FLAGS)})")


def cpu_flags():
    """The CPU's feature flags, from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f
                         if line.startswith("flags")), set())
    except OSError:
        return set()


def synchronize_batch_norm(model):
    """Turns every BatchNormalization inside `model` into a cross-replica
    one (`synchronized=True`, saved in its config); returns how many.
    Without a multi-replica strategy it computes the same statistics."""
    count = 0
    for layer in compat.all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True
            count += 1
    return count


def replica_context():
    """The replica context when more than one replica is in sync, else None."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def gather_global_batch(context, indices, rows=None):
    """All replicas' (indices, rows) concatenated in replica order, and this
    replica's (start, size) in it (all_rows None without `rows`).

    Built from all-reduce sums of zero-padded blocks (each replica fills its
    own block; x + 0 is exact) rather than `ReplicaContext.all_gather`, which
    fails inside a MultiWorkerMirroredStrategy step in TF 2.21 ("destinations
    can not be empty"); all-reduce is what every strategy does for gradients.
    It moves R times the gathered bytes, (R B) x d floats: small beside the
    gradients of the encoder.
    """
    replicas = context.num_replicas_in_sync
    replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
    size = tf.shape(indices)[0]
    sizes = context.all_reduce("sum", tf.one_hot(replica, replicas, dtype=tf.int32) * size)
    start = tf.reduce_sum(sizes[:replica])
    after = tf.reduce_sum(sizes) - start - size
    all_indices = context.all_reduce("sum", tf.pad(indices, [[start, after]]))
    all_rows = (None if rows is None else
                context.all_reduce("sum", tf.pad(rows, [[start, after], [0, 0]])))
    return all_indices, all_rows, start, size


def global_batch_std(z):
    """collapse_std over the global batch: the std over all replicas' rows of
    the l2-normalised z, averaged over dimensions (two all-reduces of d
    floats); on one replica the plain batch std."""
    z = ops.normalize(ops.cast(z, "float32"), axis=-1)
    context = replica_context()
    if context is None:
        return ops.mean(ops.std(z, axis=0))
    total = context.all_reduce("sum", tf.cast(tf.shape(z)[0], tf.float32))
    mean = context.all_reduce("sum", tf.reduce_sum(z, axis=0)) / total
    variance = context.all_reduce("sum", tf.reduce_sum(tf.square(z - mean), axis=0)) / total
    return ops.mean(ops.sqrt(variance))


# The default model's training step with --jit over without it on a 2-core
# CPU, float32 (docs/benchmarks.md, XLA on a CPU).
JIT_CPU_SLOWDOWN = 30


def jit_compile(jit, strategy):
    """`model.compile(jit_compile=...)` for `--jit` under `strategy`.

    Keras 3 (TF backend) XLA-compiles the function that calls
    `strategy.run`, so a strategy with several devices in this process
    (MirroredStrategy over 2+ GPUs or logical CPUs) cannot be jit-compiled:
    XLA refuses variables on another device. There, Keras's auto is off and
    `--jit` is an error; on TPU every step is compiled anyway; elsewhere None
    means Keras's "auto".
    """
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return False  # TPUStrategy compiles every step with XLA by itself.
    try:
        local_devices = len(strategy.extended.worker_devices)
    except RuntimeError:  # The default strategy: one device.
        local_devices = 1
    if local_devices > 1:
        if jit:
            raise ConfigError(
                f"{flag('jit')} is not supported with {local_devices} devices in one "
                "process (Keras 3 XLA-compiles the whole strategy.run, and XLA cannot "
                "use variables on another device); use --no-jit, or one device per "
                "worker with --strategy multi_worker")
        return False
    if jit and not tf.config.list_physical_devices("GPU"):
        logger.warning(
            "%s on a CPU-only run: XLA made the default model's training step about %dx "
            "slower here, after minutes of compiling (docs/benchmarks.md, XLA on a CPU); "
            "it pays on GPUs and TPUs. Drop --jit: Keras's auto leaves XLA off on CPUs",
            flag("jit"), JIT_CPU_SLOWDOWN)
    return "auto" if jit is None else bool(jit)


def is_multi_worker(strategy):
    """Whether `strategy` is a MultiWorkerMirroredStrategy with several workers."""
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and compat.in_multi_worker_mode(strategy))
