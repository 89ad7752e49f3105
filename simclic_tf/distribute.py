"""Scale: the tf.distribute strategy, mixed precision, cross-replica
BatchNorm, and the glue that keeps the history buffer identical on every
replica (docs/DESIGN.md section 5).

History under distribution ("replicated"): every replica holds a full copy
of the bank and the visit counts. In each training step the replicas
all-gather `(indices, new_rows)` (by all-reduce, replica order, so the gathered batch is
the global batch in the order a single device sees it), every replica runs
the same exchange on the global batch against its own copy, and keeps the
old rows of its own positions. All copies therefore receive the same writes
(duplicates across replicas write their mean, as on one device) and stay
bit-identical. The variables are `synchronization=ON_READ`,
`aggregation=ONLY_FIRST_REPLICA`: inside a replica each one reads and writes
its local copy without a cross-device merge (an ON_WRITE MirroredVariable
would need a `merge_call` per update, which a jit-compiled step cannot hold),
and outside (checkpoints, `.keras` files, `.numpy()`) the first replica's
copy is the value, while a restore assigns it to every copy.

History sharded ("sharded", `--bank-layout`): with R replicas, replica r
owns the global rows i with i % R == r (strided: balanced, no offset table),
at local row i // R of its copy of the same ON_READ variables, which has
ceil(N / R) rows and a scratch row last. In each step the replicas all-gather
`(indices, new_rows)` as above; each runs the unchanged exchange on its shard,
the positions it owns at their local rows and every other one at the scratch
row, keeps the old rows and `seen` of its own positions only, and a second
all-reduce sums them, so every replica has the old rows of the whole global
batch. Each row is written by its owner alone, with the same mean of
duplicates as on one device. `gather_shards` and `assign_shards` move
between the shards and the logical (N, ...) arrays that checkpoints and
`.keras` files hold.
"""

import json
import logging
import os

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from simclic_tf import compat
from simclic_tf.config import ConfigError, flag
from simclic_tf.kernels.history import check_indices

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")

# Creation settings of the history bank and visit counts (module docstring).
REPLICATED_VARIABLE = {"synchronization": "on_read", "aggregation": "only_first_replica"}
BANK_LAYOUTS = ("auto", "replicated", "sharded")
# "auto" shards a bank whose full copy would take more than this per replica.
AUTO_SHARDED_BYTES = 1 << 30


def make_strategy(name="auto"):
    """The tf.distribute strategy `--strategy NAME` asks for.

    auto: MirroredStrategy when several GPUs are visible, else the default
    (one device). multi_worker: MultiWorkerMirroredStrategy with the cluster
    of the TF_CONFIG environment variable (one worker without it); create it
    before any other TensorFlow work in the process. tpu: TPUStrategy over
    the TPU that TPUClusterResolver finds (TPU_NAME, or a local TPU VM).
    """
    name = getattr(name, "strategy", name)  # A SimCLICConfig is accepted too.
    if name not in STRATEGIES:
        raise ConfigError(f"{flag('strategy')} {name!r} is not accepted; choose one of: "
                          f"{', '.join(STRATEGIES)}")
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
    weights; the loss, normalisations, z_std and history math stay float32)."""
    name = getattr(name, "precision", name)
    if name not in PRECISIONS:
        raise ConfigError(f"{flag('precision')} {name!r} is not accepted; choose one of: "
                          f"{', '.join(PRECISIONS)}")
    keras.mixed_precision.set_global_policy(name)


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


def local_variable(variable):
    """The `tf.Variable` a kernel should update in place: inside a replica,
    this replica's copy of a distributed (ON_READ) variable; else the
    variable behind a keras.Variable."""
    inner = compat.tf_variable(variable) if isinstance(variable, keras.Variable) else variable
    if (isinstance(inner, tf.distribute.DistributedValues)
            and tf.distribute.get_replica_context() is not None):
        return compat.on_this_replica(inner)
    return inner


def replicated_exchange(exchange, bank, visits, indices, new_rows, momentum):
    """`exchange(bank, visits, indices, new_rows, momentum)` kept consistent
    across replicas: (old_rows, seen) of this replica's positions, after every
    copy of the bank took the writes of the whole global batch."""
    bank, visits = local_variable(bank), local_variable(visits)
    context = replica_context()
    if context is None:
        return exchange(bank, visits, indices, new_rows, momentum)
    all_indices, all_rows, start, size = _gather_global_batch(context, indices, new_rows)
    old_rows, seen = exchange(bank, visits, all_indices, all_rows, momentum)
    return (tf.slice(old_rows, [start, 0], [size, -1]), tf.slice(seen, [start], [size]))


def bank_bytes(num_rows, dim, dtype):
    """The bytes of `num_rows` history rows of `dim` `dtype` values and their
    visit counts."""
    return num_rows * (dim * tf.as_dtype(dtype).size + 4)


def bank_shards(layout, num_rows, dim, dtype):
    """How many shards the current strategy splits a history bank of
    `num_rows` x `dim` `dtype` into for `--bank-layout layout`: its R
    replicas for "sharded", and for "auto" when a full copy would take more
    than AUTO_SHARDED_BYTES; else 1 (replicated, as one replica always is)."""
    if layout not in BANK_LAYOUTS:
        raise ConfigError(f"{flag('bank_layout')} {layout!r} is not accepted; choose one "
                          f"of: {', '.join(BANK_LAYOUTS)}")
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if layout == "replicated" or (
            layout == "auto" and bank_bytes(num_rows, dim, dtype) <= AUTO_SHARDED_BYTES):
        return 1
    return replicas


def shard_rows(num_rows, shards):
    """The rows of each replica's copy of a bank of `num_rows` rows in
    `shards` shards: all of them unsharded, else ceil(num_rows / shards)
    owned rows and the scratch row."""
    return num_rows if shards == 1 else -(-num_rows // shards) + 1


def sharded_exchange(exchange, bank, visits, indices, new_rows, momentum, num_rows):
    """`exchange(bank, visits, indices, new_rows, momentum)` on a bank of
    `num_rows` logical rows sharded across the replicas (module docstring):
    (old_rows, seen) of this replica's positions, after every shard took the
    writes of the global batch's rows it owns."""
    bank, visits = local_variable(bank), local_variable(visits)
    context = _sharded_context()
    all_indices, all_rows, start, size = _gather_global_batch(context, indices, new_rows)
    keep, local = _shard_positions(context, all_indices, num_rows, bank.shape[0])
    # The global indices, so that the error names them and N, not the shard's.
    check = check_indices(all_indices, num_rows)
    with tf.control_dependencies([check] if check is not None else []):
        old_rows, seen = exchange(bank, visits, local, all_rows, momentum)
    return _sum_kept(context, keep, old_rows, seen, start, size)


def sharded_read(bank, visits, indices, num_rows):
    """(rows as float32, seen) of this replica's `indices` in a sharded bank,
    nothing written (evaluation): each replica reads the rows of the global
    batch it owns, and one all-reduce gives every replica all of them."""
    bank, visits = local_variable(bank), local_variable(visits)
    context = _sharded_context()
    all_indices, _, start, size = _gather_global_batch(context, indices)
    keep, local = _shard_positions(context, all_indices, num_rows, bank.shape[0])
    rows = tf.cast(tf.gather(bank, local), tf.float32)
    return _sum_kept(context, keep, rows, tf.gather(visits, local) > 0, start, size)


def _sharded_context():
    """The replica context a sharded bank is used in; outside one, no
    replica's shard holds the rows the indices name."""
    context = replica_context()
    if context is None:
        raise ValueError("a sharded history bank is read and written inside the strategy's "
                         "replicas (model.fit, model.evaluate, strategy.run), not outside")
    return context


def _shard_positions(context, indices, num_rows, rows):
    """(keep, local) of the global batch's `indices` on this replica's shard
    of `rows` rows: an index it owns is at local row i // R and kept; any
    other goes to the scratch row (last) and its results are dropped. An
    index outside [0, num_rows) is out of range on every shard too (under XLA
    the exchange then returns a NaN row) and kept everywhere, so that the NaN
    reaches its replica."""
    replicas = context.num_replicas_in_sync
    replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
    valid = (indices >= 0) & (indices < num_rows)
    owned = valid & (indices % replicas == replica)
    local = tf.where(owned, indices // replicas, tf.where(valid, rows - 1, -1))
    return owned | ~valid, local


def _sum_kept(context, keep, rows, seen, start, size):
    """The replicas' kept (rows, seen), zero elsewhere, summed in one
    all-reduce (`seen` as a last column; each position is kept by one replica,
    and x + 0 is exact), and this replica's (start, size) slice of them."""
    packed = tf.concat([rows, tf.cast(seen, rows.dtype)[:, None]], axis=1)
    packed = context.all_reduce("sum", tf.where(keep[:, None], packed, tf.zeros_like(packed)))
    packed = tf.slice(packed, [start, 0], [size, -1])
    return packed[:, :-1], packed[:, -1] > 0


def gather_shards(variable, num_rows):
    """The logical value (num_rows, ...) of a sharded bank or visit-count
    variable, as numpy. In one process, from the replicas' copies; under a
    multi-worker MultiWorkerMirroredStrategy, by an all-reduce of zero-padded
    blocks (as `_gather_global_batch`): a collective that every worker must
    run at the same point, as Keras's saving does on every worker."""
    inner = compat.tf_variable(variable) if isinstance(variable, keras.Variable) else variable
    strategy = inner.distribute_strategy
    if is_multi_worker(strategy):
        shards = _all_shards(strategy, inner)
    else:
        shards = np.stack([copy.numpy() for copy in inner.values])
    # shards[r, j] is row j * R + r; the scratch rows (last) are dropped.
    owned = np.swapaxes(shards[:, :-1], 0, 1)
    return owned.reshape((-1,) + shards.shape[2:])[:num_rows]


def _all_shards(strategy, variable):
    """Every replica's copy of `variable` stacked in replica order (R, rows,
    ...), on every worker."""
    replicas = strategy.num_replicas_in_sync

    def stack():
        context = tf.distribute.get_replica_context()
        shard = tf.convert_to_tensor(local_variable(variable))[None]
        mine = tf.range(replicas) == tf.cast(context.replica_id_in_sync_group, tf.int32)
        mine = tf.reshape(mine, [replicas] + [1] * (shard.shape.rank - 1))
        return context.all_reduce("sum", tf.where(mine, shard, tf.zeros_like(shard)))

    stacked = tf.function(lambda: strategy.run(stack), autograph=False)()
    return strategy.experimental_local_results(stacked)[0].numpy()


def assign_shards(variable, logical):
    """Assigns each replica's copy of a sharded `variable` its rows of the
    logical array `logical` (num_rows, ...): global row i to local row i // R
    of replica i % R; the rows past the end and the scratch row get zeros."""
    inner = compat.tf_variable(variable) if isinstance(variable, keras.Variable) else variable
    strategy = inner.distribute_strategy
    rows = inner.values[0].shape[0]

    def shard(context):
        owned = logical[context.replica_id_in_sync_group::context.num_replicas_in_sync]
        padding = np.zeros((rows - len(owned),) + owned.shape[1:], owned.dtype)
        return tf.convert_to_tensor(np.concatenate([owned, padding]))

    def assign(shards):
        strategy.run(lambda shard: local_variable(inner).assign(shard), args=(shards,))

    tf.function(assign, autograph=False)(
        strategy.experimental_distribute_values_from_function(shard))


def _gather_global_batch(context, indices, rows=None):
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
    return "auto" if jit is None else bool(jit)


def is_multi_worker(strategy):
    """Whether `strategy` is a MultiWorkerMirroredStrategy with several workers."""
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and compat.in_multi_worker_mode(strategy))
