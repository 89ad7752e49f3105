"""A callback the ramp tests share: the history mix each training step used."""

import keras
import numpy as np


class MixRecorder(keras.callbacks.Callback):
    """The history mix each training step used, as its batch logs report it."""

    def on_train_begin(self, logs=None):
        self.mixes = []

    def on_train_batch_end(self, batch, logs=None):
        self.mixes.append(float(np.ravel(logs["mix"])[0]))
