"""Callbacks for pretraining: the kNN monitor, the collapse alarm, the
divergence and signal stops, and a CSV logger that survives resuming. Put the monitors before `keras.callbacks.TensorBoard` so
their values reach its logs, and the stops before
`keras.callbacks.BackupAndRestore` so that a bad epoch is never saved."""

import csv
import math
import os

import keras
import numpy as np

from simclic_tf.evaluation import extract_features, knn_accuracy
from simclic_tf.faults import Diverged, Interrupted

# z_rank below this is a collapse: healthy runs ended at 0.33 to 0.61 here,
# SimSiam without stop-gradient at 0.03 to 0.20 (docs/benchmarks.md, Collapse signals).
COLLAPSED_RANK = 0.25


class KNNMonitor(keras.callbacks.Callback):
    """Weighted kNN accuracy of the backbone after the first epoch and every
    `every` epochs, added to the epoch logs as `knn_accuracy` (so TensorBoard,
    History and tuners see it).

    Args:
      memory: labelled image set whose features are the kNN memory bank.
      queries: labelled image set to classify.
    """

    def __init__(self, memory, queries, k=200, temperature=0.1, every=1):
        super().__init__()
        self.memory = memory
        self.queries = queries
        self.k = k
        self.temperature = temperature
        self.every = every

    def on_epoch_end(self, epoch, logs=None):
        # Always after the first epoch too: its keys fix the columns of CSVLogger.
        if logs is None or (epoch > 0 and (epoch + 1) % self.every):
            return
        logs["knn_accuracy"] = self.accuracy(self.model.backbone)

    def accuracy(self, backbone):
        """The kNN accuracy of `backbone`'s features of the queries."""
        return knn_accuracy(
            extract_features(backbone, self.memory), self.memory.labels,
            extract_features(backbone, self.queries), self.queries.labels,
            self.memory.num_classes, k=self.k, temperature=self.temperature)


class CollapseMonitor(keras.callbacks.Callback):
    """Says plainly when the representation has collapsed, and with `stop`
    ends training there (`model.stop_training`: the run then evaluates,
    exports and reports as usual).

    Collapsed: `z_rank` (the batch of z's effective rank, as a fraction of
    its most) below `rank_fraction`, the dimensional collapse of SimSiam
    without stop-gradient; or `z_std` below `std_fraction / sqrt(dim)`, every
    image mapped to one point (a healthy run sits near 1 / sqrt(dim)).
    """

    def __init__(self, dim, rank_fraction=COLLAPSED_RANK, std_fraction=0.1, stop=False):
        super().__init__()
        self.rank_threshold = rank_fraction
        self.std_threshold = std_fraction / math.sqrt(dim)
        self.stop = stop
        self.collapsed_at = None

    def is_collapsed(self, metrics):
        """Whether final metrics {name: value} (z_rank, z_std) show a collapse;
        None when neither was measured."""
        z_rank, z_std = metrics.get("z_rank"), metrics.get("z_std")
        if z_rank is None and z_std is None:
            return None
        return bool((z_rank is not None and z_rank < self.rank_threshold)
                    or (z_std is not None and z_std < self.std_threshold))

    def describe(self):
        return (f"z_rank below {self.rank_threshold:g} or z_std below "
                f"{self.std_threshold:.2e}")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.collapsed_at is None and self.is_collapsed(logs):
            self.collapsed_at = epoch + 1
            z_rank, z_std = (logs.get(name, float("nan")) for name in ("z_rank", "z_std"))
            print(f"\nCOLLAPSE at epoch {epoch + 1}: z_rank {z_rank:.3f}, z_std {z_std:.2e} "
                  f"({self.describe()}): the images map to a few directions of z"
                  + ("; stopping (--stop-on-collapse)." if self.stop
                     else ". --stop-on-collapse ends a run here."))
            if self.stop:
                self.model.stop_training = True


class DivergenceGuard(keras.callbacks.Callback):
    """Raises `Diverged` at the first step whose loss is not finite, and at
    the end of an epoch whose weights are not all finite (before the backup
    saves them), with advice for the run's `config`. Keras's TerminateOnNaN
    stops through `stop_training`, which ends the run as if it had completed
    (the backup is deleted, the weights exported) and names no epoch."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.all(np.isfinite(loss)):
            raise Diverged(self.config, self.epoch, batch + 1,
                           f"the loss ({float(np.ravel(loss)[0])})")

    def on_epoch_end(self, epoch, logs=None):
        for variable in self.model.weights:
            if not bool(keras.ops.all(keras.ops.isfinite(variable))):
                raise Diverged(self.config, self.epoch, self.params["steps"],
                               f"the weight {variable.path}")


class SignalStop(keras.callbacks.Callback):
    """Ends training at the end of the step during which a `faults.StopOnSignal`
    recorded SIGINT or SIGTERM, by raising `Interrupted`, so the backup of
    the last whole epoch is kept, as after a crash. A signal that came
    between steps (in an epoch-end monitor) stops it at the next epoch's
    start or, after the last epoch, at the end of training: after the backup
    saved the epoch."""

    def __init__(self, stop, run_dir):
        super().__init__()
        self.stop = stop
        self.run_dir = run_dir
        self.epoch = 0

    def on_train_begin(self, logs=None):
        self.stop.training = True

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1
        self._stop_if_asked(f"before epoch {self.epoch}", completed=epoch)

    def on_train_batch_end(self, batch, logs=None):
        self._stop_if_asked(f"at epoch {self.epoch}, step {batch + 1}", completed=self.epoch - 1)

    def on_train_end(self, logs=None):
        self.stop.training = False
        self._stop_if_asked("after the last epoch", completed=self.params["epochs"])

    def _stop_if_asked(self, where, completed):
        if self.stop.received is not None:
            self.stop.training = False
            raise Interrupted(self.stop.received, self.run_dir, where, completed)


class ResumableCSVLogger(keras.callbacks.CSVLogger):
    """CSVLogger that resumes a file: it keeps the existing columns, and drops
    the rows of the epoch it resumes at and after (written after the last
    checkpoint, or cut short by a kill), so no epoch is ever written twice.

    Keras's takes its columns from the first epoch it sees, so a resumed run
    whose first epoch lacks a key (kNN runs every few epochs) would write rows
    that do not match the header; and it appends whatever the file holds.
    """

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.resumed = False
        if self.append and os.path.exists(self.filename):
            with open(self.filename, newline="") as f:
                header = next(csv.reader(f), None)
            if header:
                self.keys = header[1:]  # after "epoch"

    def on_epoch_begin(self, epoch, logs=None):
        if self.append and not self.resumed and self.keys:
            self.csv_file.close()
            with open(self.filename, newline="") as f:
                header, *rows = csv.reader(f)
            kept = [row for row in rows if len(row) == len(header) and row[0].isdigit()
                    and int(row[0]) < epoch]
            with open(self.filename, "w", newline="") as f:
                csv.writer(f).writerows([header] + kept)
            self.csv_file = open(self.filename, "a", newline="")
        self.resumed = True
