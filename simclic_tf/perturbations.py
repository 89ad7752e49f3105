"""Perturbations P(z, i): how SimCLIC builds the target view from the
representation z the encoder produced for sample i (docs/DESIGN.md section 1).

Each is one Keras layer registered under its CLI name. A layer takes the
tuple of the views' representations and returns one perturbed tensor per
view; `strength` is the single knob the tuner searches.
"""

import keras
from keras import ops

from simclic_tf import distribute, history_bank, kernels
from simclic_tf.registry import PERTURBATIONS


class Perturbation(keras.layers.Layer):
    """Base class. Subclasses set `default_strength` and `strength_range`
    (None when the perturbation has no knob), `rampable` when the strength ramp
    can schedule their strength, and implement `perturb`."""

    default_strength = None
    strength_range = None
    rampable = False

    def __init__(self, strength=None, seed=None, kernel_impl="auto", **kwargs):
        super().__init__(**kwargs)
        self.strength = self.default_strength if strength is None else float(strength)
        self.seed = seed
        self.kernel_impl = kernel_impl
        # No shape-dependent weights: built now, so that Keras's symbolic
        # build under a tf.distribute strategy does not try to call it.
        self.built = True

    @property
    def kernels(self):
        """The kernel implementation `kernels.select(kernel_impl)` picks (first use)."""
        return kernels.select(self.kernel_impl)

    @classmethod
    def from_run_config(cls, config, num_samples):
        """Builds the layer from the run's SimCLICConfig."""
        return cls(strength=config.strength, seed=config.seed, kernel_impl=config.kernel_impl)

    def call(self, zs, indices, training=False):
        return tuple(self.perturb(z, training) for z in zs)

    def perturb(self, z, training):
        raise NotImplementedError

    def get_config(self):
        return {**super().get_config(), "strength": self.strength, "seed": self.seed,
                "kernel_impl": self.kernel_impl}


@PERTURBATIONS.register("none")
@keras.saving.register_keras_serializable("simclic_tf")
class NoPerturbation(Perturbation):
    """The target is z itself: exactly SimSiam, the baseline."""

    def perturb(self, z, training):
        return z


@PERTURBATIONS.register("dropout")
@keras.saving.register_keras_serializable("simclic_tf")
class DropoutPerturbation(Perturbation):
    """dropout(z, rate) with inverted scaling, active in training only."""

    default_strength = 0.2
    strength_range = (0.0, 0.95)

    def __init__(self, strength=None, seed=None, **kwargs):
        super().__init__(strength, seed, **kwargs)
        self.dropout = keras.layers.Dropout(self.strength, seed=seed)

    def perturb(self, z, training):
        return self.dropout(z, training=training)


@PERTURBATIONS.register("noise")
@keras.saving.register_keras_serializable("simclic_tf")
class NoisePerturbation(Perturbation):
    """z + s * std_batch(z) * eps: Gaussian noise scaled by the batch's own
    spread, so `s` means the same whatever the scale of z."""

    default_strength = 0.5
    strength_range = (0.0, 10.0)

    def __init__(self, strength=None, seed=None, **kwargs):
        super().__init__(strength, seed, **kwargs)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def perturb(self, z, training):
        if not training:
            return z
        seed = ops.cast(self.seed_generator.next(), "int32")
        return self.kernels.representation_noise(z, self.strength, seed)


@PERTURBATIONS.register("history")
@keras.saving.register_keras_serializable("simclic_tf")
class HistoryPerturbation(Perturbation):
    """The target is the sample's representation from its previous visit,
    mixed with the current one: normalize(a * H^[i] + (1 - a) * z^).

    The history buffer H (num_samples x dim) and the per-row visit count are
    the non-trainable weights of `history_bank`, so checkpoints and `.keras`
    files carry them. In training, each call reads the rows of the batch and
    writes the mean of the views' z in the same O(batch x dim) exchange;
    rows never written yet fall back to z.

    `bank_layout` says how the strategy the layer is built under holds them
    (simclic_tf/history_bank.py): "replicated", a full copy on every replica;
    "sharded", about num_samples / R rows on each of R replicas; "auto",
    sharded when a full copy would take more than 1 GiB per replica. Saved
    files hold the logical buffer whatever the layout (`bank_rows`), so they
    load on any number of replicas.
    """

    default_strength = 1.0
    strength_range = (0.0, 1.0)
    # The mix is a weight read in the step, so the model's ramp can move it
    # (dropout's rate and the noise kernel's scale are fixed at build).
    rampable = True

    def __init__(self, num_samples, dim, strength=None, momentum=0.0,
                 bank_dtype="float32", bank_layout="auto", seed=None, **kwargs):
        super().__init__(strength, seed, **kwargs)
        self.num_samples = int(num_samples)
        self.dim = int(dim)
        self.momentum = float(momentum)
        self.bank_dtype = bank_dtype
        self.bank_layout = bank_layout
        # In this layer's name scope: the variables' paths are "<name>/bank"
        # and "<name>/visits" whatever the layout.
        with keras.name_scope(self.name, caller=self):
            self.history_bank = history_bank.create(bank_layout, self.num_samples,
                                                    self.dim, bank_dtype)
            # The mix a in use: `strength`, unless the model's strength ramp
            # sets it each step. On read, as the bank: each replica sets its
            # own copy to the same value, with no cross-replica merge.
            self.mix = keras.Variable(self.strength, dtype="float32", trainable=False,
                                      autocast=False, name="mix", **history_bank.ON_READ)

    @classmethod
    def from_run_config(cls, config, num_samples):
        return cls(num_samples, config.proj_dim, strength=config.strength,
                   momentum=config.history_momentum, bank_dtype=config.bank_dtype,
                   bank_layout=config.bank_layout, seed=config.seed,
                   kernel_impl=config.kernel_impl)

    @property
    def bank(self):
        """The buffer's variable: each replica's copy, or shard of about
        num_samples / R rows; `bank_rows()` gives the logical buffer."""
        return self.history_bank.bank

    @property
    def visits(self):
        """The visit counts' variable, as `bank`."""
        return self.history_bank.visits

    def call(self, zs, indices, training=False):
        indices = ops.cast(indices, "int32")
        if training:
            new_rows = ops.stop_gradient(sum(ops.cast(z, "float32") for z in zs) / len(zs))
            old_rows, seen = self.history_bank.exchange(
                self.kernels.history_exchange, indices, new_rows, self.momentum)
        else:
            old_rows, seen = self.history_bank.read(indices)
        return tuple(self._mix(old_rows, seen, z) for z in zs)

    def bank_rows(self):
        """The history buffer as numpy (num_samples, dim), in either layout
        (sharded under MultiWorkerMirroredStrategy: a collective, which every
        worker must call)."""
        return self.history_bank.rows()

    def visit_counts(self):
        """The visit counts as numpy (num_samples,), as `bank_rows`."""
        return self.history_bank.visit_counts()

    def _mix(self, old_rows, seen, z):
        a = ops.convert_to_tensor(self.mix)
        current = ops.normalize(ops.cast(z, "float32"), axis=-1)
        mixed = ops.normalize(a * ops.normalize(old_rows, axis=-1) + (1 - a) * current, axis=-1)
        return ops.cast(ops.where(seen[:, None], mixed, ops.cast(z, "float32")), z.dtype)

    def get_config(self):
        return {**super().get_config(), "num_samples": self.num_samples, "dim": self.dim,
                "momentum": self.momentum, "bank_dtype": self.bank_dtype,
                "bank_layout": self.bank_layout}


class HistoryThen(HistoryPerturbation):
    """The history target, then a memoryless perturbation of it (`then`, at
    its default strength): old and noisy at once. `strength` stays the
    history mix a, the knob the tuner searches."""

    then = None

    def __init__(self, num_samples, dim, **kwargs):
        super().__init__(num_samples, dim, **kwargs)
        self.second = self.then(seed=self.seed, kernel_impl=self.kernel_impl)

    def call(self, zs, indices, training=False):
        return self.second(super().call(zs, indices, training), indices, training=training)


@PERTURBATIONS.register("history+noise")
@keras.saving.register_keras_serializable("simclic_tf")
class HistoryThenNoise(HistoryThen):
    """normalize(a H^[i] + (1 - a) z^) + s std(z) eps, s = 0.5."""

    then = NoisePerturbation


@PERTURBATIONS.register("history+dropout")
@keras.saving.register_keras_serializable("simclic_tf")
class HistoryThenDropout(HistoryThen):
    """dropout(normalize(a H^[i] + (1 - a) z^), 0.2)."""

    then = DropoutPerturbation


@PERTURBATIONS.register("nearest_neighbour")
@keras.saving.register_keras_serializable("simclic_tf")
class NearestNeighbourPerturbation(Perturbation):
    """The target is z's nearest neighbour (highest cosine) in a support
    queue of the last `queue_size` l2-normalised first-view z: NNCLR's
    target (Dwibedi et al. 2021), NNSiam's on SimSiam.

    The queue, its write pointer and its filled row count are non-trainable
    weights, so checkpoints and `.keras` files carry them; rows never written
    are skipped, and z itself is the target until one is. In training, after
    the lookup, the queue takes the batch's first-view z first in, first out;
    under tf.distribute the global batch's, all-gathered in replica order, so
    that every replica's copy (on read, as the history bank's) takes the same
    writes and stays identical. Each step reads the whole queue (the lookup is
    a batch x queue_size product), so it is rewritten whole too.
    """

    def __init__(self, queue_size, dim, **kwargs):
        super().__init__(**kwargs)
        self.queue_size = int(queue_size)
        self.dim = int(dim)
        with keras.name_scope(self.name, caller=self):
            self.queue = keras.Variable(initializer="zeros", shape=(self.queue_size, self.dim),
                                        dtype="float32", trainable=False, autocast=False,
                                        name="queue", **history_bank.ON_READ)
            self.pointer, self.filled = (
                keras.Variable(0, dtype="int32", trainable=False, autocast=False, name=name,
                               **history_bank.ON_READ) for name in ("pointer", "filled"))

    @classmethod
    def from_run_config(cls, config, num_samples):
        return cls(config.queue_size, config.proj_dim, seed=config.seed,
                   kernel_impl=config.kernel_impl)

    def call(self, zs, indices, training=False):
        queue = ops.convert_to_tensor(self.queue)
        filled = ops.convert_to_tensor(self.filled)
        targets = tuple(self.nearest(z, queue, filled) for z in zs)
        if training:
            self.enqueue(zs[0], indices)
        return targets

    def nearest(self, z, queue, filled):
        """The queue row of highest cosine with each row of z, among the
        `filled` rows written; z itself while none is."""
        similarity = ops.matmul(ops.normalize(ops.cast(z, "float32"), axis=-1),
                                ops.transpose(queue))
        written = ops.arange(self.queue_size) < filled
        neighbours = ops.take(queue, ops.argmax(ops.where(written, similarity, -2.0), axis=-1),
                              axis=0)
        return ops.where(filled > 0, ops.cast(neighbours, z.dtype), z)

    def enqueue(self, z, indices):
        """Writes the (global) batch's l2-normalised z at the pointer, first
        in, first out."""
        rows = ops.stop_gradient(ops.normalize(ops.cast(z, "float32"), axis=-1))
        context = distribute.replica_context()
        if context is not None:
            _, rows, _, _ = distribute.gather_global_batch(
                context, ops.cast(indices, "int32"), rows)
        count = ops.shape(rows)[0]
        pointer = ops.convert_to_tensor(self.pointer)
        positions = (pointer + ops.arange(count, dtype="int32")) % self.queue_size
        self.queue.assign(ops.scatter_update(self.queue, positions[:, None], rows))
        self.pointer.assign((pointer + count) % self.queue_size)
        self.filled.assign(ops.minimum(self.filled + count, self.queue_size))

    def get_config(self):
        return {**super().get_config(), "queue_size": self.queue_size, "dim": self.dim}
