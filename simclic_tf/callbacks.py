"""Callbacks for pretraining: the kNN monitor, the strength ramp, the
collapse alarm, and a CSV logger that survives resuming. Put the monitors before
`keras.callbacks.TensorBoard` so their values reach its logs."""

import csv
import math
import os

import keras

from simclic_tf.evaluation import extract_features, knn_accuracy


class KNNMonitor(keras.callbacks.Callback):
    """Weighted kNN accuracy of the backbone after the first epoch and every
    `every` epochs, added to the epoch logs as `knn_accuracy` (so TensorBoard,
    History and tuners see it).

    Args:
      memory: labelled ImageSet whose features are the kNN memory bank.
      queries: labelled ImageSet to classify.
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
        backbone = self.model.backbone
        logs["knn_accuracy"] = knn_accuracy(
            extract_features(backbone, self.memory.images), self.memory.labels,
            extract_features(backbone, self.queries.images), self.queries.labels,
            self.memory.num_classes, k=self.k, temperature=self.temperature)


class StrengthRamp(keras.callbacks.Callback):
    """Ramps the history mix a linearly from 0 (the SimSiam target) to the
    perturbation's `strength` over the first `ramp` fraction of `epochs`,
    one step per epoch: a curriculum from the current view to the old one."""

    def __init__(self, epochs, ramp):
        super().__init__()
        self.ramp_epochs = ramp * epochs

    def on_epoch_begin(self, epoch, logs=None):
        layer = self.model.perturbation
        layer.mix.assign(layer.strength * min(1.0, epoch / self.ramp_epochs))


class CollapseMonitor(keras.callbacks.Callback):
    """Says plainly when the representation has collapsed: `z_std` below
    `fraction / sqrt(dim)` (a healthy run sits near 1 / sqrt(dim))."""

    def __init__(self, dim, fraction=0.1):
        super().__init__()
        self.threshold = fraction / math.sqrt(dim)
        self.collapsed_at = None

    def on_epoch_end(self, epoch, logs=None):
        z_std = (logs or {}).get("z_std")
        if z_std is not None and z_std < self.threshold and self.collapsed_at is None:
            self.collapsed_at = epoch + 1
            print(f"\nCOLLAPSE: at epoch {epoch + 1} z_std = {z_std:.2e} is below "
                  f"{self.threshold:.2e}: every image maps to nearly the same z.")


class ResumableCSVLogger(keras.callbacks.CSVLogger):
    """CSVLogger that keeps an existing file's columns when it appends.

    Keras's takes its columns from the first epoch it sees, so a resumed run
    whose first epoch lacks a key (kNN runs every few epochs) would write rows
    that do not match the header.
    """

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.append and os.path.exists(self.filename):
            with open(self.filename, newline="") as f:
                header = next(csv.reader(f), None)
            if header:
                self.keys = header[1:]  # after "epoch"
