"""Helper of tests/test_distribute.py, run as a subprocess (two logical CPU
devices): a tiny SimCLIC with the history strength ramp trained under a
MirroredStrategy over both, writing as JSON the mix each step logged and
each replica's copy of the mix variable at the end.

    python tests/ramp_mirrored.py OUT.json
"""

import json
import sys

import two_logical_cpus  # noqa: F401 (first: before TensorFlow starts)
import tensorflow as tf  # noqa: E402

import numpy as np  # noqa: E402

from mix_recorder import MixRecorder  # noqa: E402
from simclic_tf import SimCLIC, SimCLICConfig, build_optimizer  # noqa: E402


def main():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    # 4 steps an epoch, 2 epochs: the ramp's half of the run is 4 steps.
    config = SimCLICConfig(backbone="tiny_convnet", width=4, proj_dim=32, pred_hidden=8,
                           batch_size=16, epochs=2, perturbation="history", strength=0.8,
                           strength_ramp=0.5)
    with strategy.scope():
        model = SimCLIC(config, (8, 8, 1), 64)
        model.compile(optimizer=build_optimizer(config, 4))
    images = np.random.default_rng(0).random((64, 8, 8, 1), "float32")
    data = tf.data.Dataset.from_tensor_slices(
        ((images, images[::-1].copy()), np.arange(64, dtype="int32"))).batch(16)
    recorder = MixRecorder()
    model.fit(data, epochs=2, verbose=0, callbacks=[recorder])
    copies = strategy.experimental_local_results(model.perturbation.mix.value)
    with open(sys.argv[1], "w") as f:
        json.dump({"mixes": recorder.mixes, "copies": [float(c.numpy()) for c in copies]}, f)


if __name__ == "__main__":
    main()
