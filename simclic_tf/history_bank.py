"""The history buffer H and its per-row visit counts (docs/DESIGN.md
section 1), held one of two ways under tf.distribute (section 5), chosen once
when the history layer is built (`create`, `--bank-layout`):

* `ReplicatedBank`: a full copy on every replica;
* `ShardedBank`: about num_rows / R rows on each of R replicas.

Both read and write the rows of a batch with the same exchange kernel
(`kernels.history_exchange` or its C++ twin), give the same old rows and
writes as one device on the global batch, and save the logical buffer
(num_rows, dim) and visit counts (num_rows,) through Keras's
`save_own_variables`: checkpoints and `.keras` files hold the same arrays
whatever the layout, and load into either, on any number of replicas.

The variables are `synchronization=ON_READ`, `aggregation=ONLY_FIRST_REPLICA`:
inside a replica each one reads and writes its local copy (or shard) without
a cross-device merge (an ON_WRITE MirroredVariable would need a `merge_call`
per update, which a jit-compiled step cannot hold); outside, the first
replica's copy is the value, while an assignment writes every copy.
"""

import logging

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from simclic_tf import compat, distribute
from simclic_tf.config import checked_value
from simclic_tf.kernels.history import check_indices

logger = logging.getLogger(__name__)

# "auto" shards a bank whose full copy would take more than this per replica.
AUTO_SHARDED_BYTES = 1 << 30
# The creation settings of the bank and visit counts (module docstring).
ON_READ = {"synchronization": "on_read", "aggregation": "only_first_replica"}


def create(layout, num_rows, dim, dtype):
    """The bank `--bank-layout layout` asks for under the current strategy:
    sharded over its R replicas for "sharded", and for "auto" when a full
    copy would take more than AUTO_SHARDED_BYTES; else replicated (as one
    replica always is). Its variables take the current name scope."""
    layout = checked_value("bank_layout", layout)
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1 and (layout == "sharded" or (
            layout == "auto" and bank_bytes(num_rows, dim, dtype) > AUTO_SHARDED_BYTES)):
        bank = ShardedBank(num_rows, dim, dtype, replicas)
        held = f"sharded over {replicas} replicas"
    else:
        bank, held = ReplicatedBank(num_rows, dim, dtype), "replicated"
    rows = bank.bank.shape[0]
    logger.info("history bank: %s, %d rows x %d %s per replica (%.1f MiB with the visit "
                "counts)", held, rows, dim, dtype,
                bank_bytes(rows, dim, dtype) / 2**20)
    return bank


def bank_bytes(num_rows, dim, dtype):
    """The bytes of `num_rows` history rows of `dim` `dtype` values and their
    visit counts."""
    return num_rows * (dim * tf.as_dtype(dtype).size + 4)


def _local(variable):
    """The `tf.Variable` a kernel updates in place: inside a replica, this
    replica's copy of the distributed (ON_READ) `variable`; else the variable
    behind the keras.Variable."""
    inner = compat.tf_variable(variable)
    if (isinstance(inner, tf.distribute.DistributedValues)
            and tf.distribute.get_replica_context() is not None):
        return compat.on_this_replica(inner)
    return inner


class HistoryBank(keras.layers.Layer):
    """A history buffer of `num_rows` rows of `dim` values (`bank`) and
    their visit counts (`visits`), `local_rows` of each on every replica.

    A Keras layer, never called, so that the history layer that holds it
    tracks its variables and Keras saves them (`save_own_variables`, under
    the keys "bank" and "visits"). Subclasses implement `exchange`, `read`
    and the moves between a variable and its logical value.
    """

    def __init__(self, num_rows, dim, row_dtype, local_rows, **kwargs):
        super().__init__(**kwargs)
        self.num_rows, self.dim = int(num_rows), int(dim)
        # autocast off, so that a mixed-precision policy never reads it as float16.
        self.bank = keras.Variable(initializer="zeros", shape=(local_rows, self.dim),
                                   dtype=row_dtype, trainable=False, autocast=False,
                                   name="bank", **ON_READ)
        self.visits = keras.Variable(initializer="zeros", shape=(local_rows,), dtype="int32",
                                     trainable=False, autocast=False, name="visits",
                                     **ON_READ)
        self.built = True

    def exchange(self, exchange_kernel, indices, new_rows, momentum):
        """(old rows as float32, seen) at this replica's `indices`, after
        `exchange_kernel` (a `kernels.history_exchange`) wrote the whole
        global batch's `new_rows` with `momentum`."""
        raise NotImplementedError

    def read(self, indices):
        """(rows as float32, seen) at this replica's `indices`, nothing
        written (inference)."""
        raise NotImplementedError

    def rows(self):
        """The logical buffer as numpy (num_rows, dim)."""
        return self._logical(self.bank)

    def visit_counts(self):
        """The logical visit counts as numpy (num_rows,)."""
        return self._logical(self.visits)

    def assign(self, rows, visits):
        """Sets the logical buffer and visit counts from arrays shaped as
        `rows()` and `visit_counts()`."""
        self._assign_logical(self.bank, rows)
        self._assign_logical(self.visits, visits)

    def save_own_variables(self, store):
        """Keras's: the logical buffer and visit counts, whatever the layout."""
        store["bank"] = self.rows()
        store["visits"] = self.visit_counts()

    def load_own_variables(self, store):
        """Keras's: from the logical buffer and visit counts."""
        self.assign(store["bank"], store["visits"])

    def _logical(self, variable):
        """The logical value of `variable` as numpy (num_rows, ...)."""
        raise NotImplementedError

    def _assign_logical(self, variable, value):
        """Assigns `variable` the logical value `value` (num_rows, ...)."""
        raise NotImplementedError


class ReplicatedBank(HistoryBank):
    """Every replica holds all the rows. Each step all-gathers the global
    batch's (indices, new rows); every replica runs the same exchange on it
    against its own copy and keeps the old rows of its own positions, so all
    copies take the same writes (duplicates across replicas write their mean,
    as on one device) and stay bit-identical."""

    def __init__(self, num_rows, dim, row_dtype, **kwargs):
        super().__init__(num_rows, dim, row_dtype, num_rows, **kwargs)

    def exchange(self, exchange_kernel, indices, new_rows, momentum):
        bank, visits = _local(self.bank), _local(self.visits)
        context = distribute.replica_context()
        if context is None:
            return exchange_kernel(bank, visits, indices, new_rows, momentum)
        all_indices, all_rows, start, size = distribute.gather_global_batch(
            context, indices, new_rows)
        old_rows, seen = exchange_kernel(bank, visits, all_indices, all_rows, momentum)
        return tf.slice(old_rows, [start, 0], [size, -1]), tf.slice(seen, [start], [size])

    def read(self, indices):
        rows = ops.cast(ops.take(self.bank, indices, axis=0), "float32")
        return rows, ops.take(self.visits, indices, axis=0) > 0

    def _logical(self, variable):
        return ops.convert_to_numpy(variable)

    def _assign_logical(self, variable, value):
        variable.assign(value)


class ShardedBank(HistoryBank):
    """Replica r of R owns the global rows i with i % R == r (strided:
    balanced, no offset table), at local row i // R of its copy, which has
    ceil(num_rows / R) rows and a scratch row last.

    Each step all-gathers the global batch's (indices, new rows) as
    `ReplicatedBank`; each replica runs the unchanged exchange on its shard,
    the positions it owns at their local rows and every other one at the
    scratch row, keeps the old rows and `seen` of its own positions only,
    and a second all-reduce sums them, so every replica has the old rows of
    the whole global batch. Each row is written by its owner alone, with the
    same mean of duplicates as on one device. Reads and writes happen inside
    the strategy's replicas (model.fit, model.evaluate, strategy.run).
    """

    def __init__(self, num_rows, dim, row_dtype, shards, **kwargs):
        super().__init__(num_rows, dim, row_dtype, -(-num_rows // shards) + 1, **kwargs)

    def exchange(self, exchange_kernel, indices, new_rows, momentum):
        context = self._context()
        all_indices, all_rows, start, size = distribute.gather_global_batch(
            context, indices, new_rows)
        keep, local = self._positions(context, all_indices)
        # The global indices, so that the error names them and N, not the shard's.
        check = check_indices(all_indices, self.num_rows)
        with tf.control_dependencies([check] if check is not None else []):
            old_rows, seen = exchange_kernel(_local(self.bank), _local(self.visits), local,
                                             all_rows, momentum)
        return self._sum_kept(context, keep, old_rows, seen, start, size)

    def read(self, indices):
        """Each replica reads the rows of the global batch it owns, and one
        all-reduce gives every replica all of them."""
        context = self._context()
        all_indices, _, start, size = distribute.gather_global_batch(context, indices)
        keep, local = self._positions(context, all_indices)
        rows = tf.cast(tf.gather(_local(self.bank), local), tf.float32)
        seen = tf.gather(_local(self.visits), local) > 0
        return self._sum_kept(context, keep, rows, seen, start, size)

    @staticmethod
    def _context():
        """The replica context; outside one, no shard holds the rows the
        indices name."""
        context = distribute.replica_context()
        if context is None:
            raise ValueError("a sharded history bank is read and written inside the "
                             "strategy's replicas (model.fit, model.evaluate, strategy.run), "
                             "not outside")
        return context

    def _positions(self, context, indices):
        """(keep, local) of the global batch's `indices` on this replica's
        shard: an index it owns is at local row i // R and kept; any other
        goes to the scratch row (last) and its results are dropped. An index
        outside [0, num_rows) is out of range on every shard too (under XLA
        the exchange then returns a NaN row) and kept everywhere, so that the
        NaN reaches its replica."""
        replicas = context.num_replicas_in_sync
        replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
        valid = (indices >= 0) & (indices < self.num_rows)
        owned = valid & (indices % replicas == replica)
        scratch = self.bank.shape[0] - 1
        local = tf.where(owned, indices // replicas, tf.where(valid, scratch, -1))
        return owned | ~valid, local

    @staticmethod
    def _sum_kept(context, keep, rows, seen, start, size):
        """The replicas' kept (rows, seen), zero elsewhere, summed in one
        all-reduce (`seen` as a last column; each position is kept by one
        replica, and x + 0 is exact), and this replica's (start, size) slice."""
        packed = tf.concat([rows, tf.cast(seen, rows.dtype)[:, None]], axis=1)
        packed = context.all_reduce("sum", tf.where(keep[:, None], packed,
                                                    tf.zeros_like(packed)))
        packed = tf.slice(packed, [start, 0], [size, -1])
        return packed[:, :-1], packed[:, -1] > 0

    def _logical(self, variable):
        """From the replicas' copies in one process; under a multi-worker
        strategy by an all-reduce (`_all_shards`): a collective that every
        worker must run at the same point, as Keras's saving does on every
        worker."""
        inner = compat.tf_variable(variable)
        if distribute.is_multi_worker(inner.distribute_strategy):
            shards = self._all_shards(inner.distribute_strategy, variable)
        else:
            shards = np.stack([copy.numpy() for copy in inner.values])
        # shards[r, j] is row j * R + r; the scratch rows (last) are dropped.
        owned = np.swapaxes(shards[:, :-1], 0, 1)
        return owned.reshape((-1,) + shards.shape[2:])[:self.num_rows]

    @staticmethod
    def _all_shards(strategy, variable):
        """Every replica's copy of `variable` stacked in replica order (R,
        rows, ...), on every worker, from all-reduce sums of zero-padded
        blocks (as `distribute.gather_global_batch`)."""
        replicas = strategy.num_replicas_in_sync

        def stack():
            context = tf.distribute.get_replica_context()
            shard = tf.convert_to_tensor(_local(variable))[None]
            mine = tf.range(replicas) == tf.cast(context.replica_id_in_sync_group, tf.int32)
            mine = tf.reshape(mine, [replicas] + [1] * (shard.shape.rank - 1))
            return context.all_reduce("sum", tf.where(mine, shard, tf.zeros_like(shard)))

        stacked = tf.function(lambda: strategy.run(stack), autograph=False)()
        return strategy.experimental_local_results(stacked)[0].numpy()

    def _assign_logical(self, variable, value):
        """Global row i goes to local row i // R of replica i % R; the rows
        past the end and the scratch row get zeros."""
        strategy = compat.tf_variable(variable).distribute_strategy
        value = np.asarray(value)
        rows = variable.shape[0]

        def shard(context):
            owned = value[context.replica_id_in_sync_group::context.num_replicas_in_sync]
            padding = np.zeros((rows - len(owned),) + owned.shape[1:], owned.dtype)
            return tf.convert_to_tensor(np.concatenate([owned, padding]))

        def assign(shards):
            strategy.run(lambda shard: _local(variable).assign(shard), args=(shards,))

        tf.function(assign, autograph=False)(
            strategy.experimental_distribute_values_from_function(shard))
