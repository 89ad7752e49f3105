"""Helper of tests/test_distribute.py, run as a subprocess (two logical CPU
devices): what `--time-budget` does to a model under a MirroredStrategy over
both, once per history-bank layout. It times the model's steps inside
`budget.undone` and fits the model to a length afterwards; written as JSON:
how far each replica's copy of every variable moved in the timed steps and
how far it stayed from its value before them, and the mix each later step
logged.

    python tests/budget_mirrored.py OUT.json
"""

import json
import sys

import two_logical_cpus  # noqa: F401 (first: before TensorFlow starts)
import tensorflow as tf  # noqa: E402

import numpy as np  # noqa: E402

from mix_recorder import MixRecorder  # noqa: E402
from simclic_tf import SimCLIC, SimCLICConfig, build_optimizer, compat  # noqa: E402
from simclic_tf.budget import undone  # noqa: E402


def copies(model):
    """Every replica's copy of every variable of `model` and its optimizer, as arrays."""
    strategy = model.distribute_strategy
    return [copy.numpy() for variable in [*model.variables, *model.optimizer.variables]
            for copy in strategy.experimental_local_results(compat.tf_variable(variable))]


def largest_change(before, after):
    return max(float(np.max(np.abs(a.astype("float64") - b.astype("float64")), initial=0.0))
               for a, b in zip(before, after))


def main():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    images = np.random.default_rng(0).random((64, 8, 8, 1), "float32")
    data = tf.data.Dataset.from_tensor_slices(
        ((images, images[::-1].copy()), np.arange(64, dtype="int32"))).batch(16).repeat()
    results = {}
    for layout in ("replicated", "sharded"):
        # Built for 1 epoch of 4 steps, fitted to 2: the ramp's half is then 4 steps.
        config = SimCLICConfig(backbone="tiny_convnet", width=4, proj_dim=32, pred_hidden=8,
                               batch_size=16, epochs=1, perturbation="history", strength=0.8,
                               strength_ramp=0.5, bank_layout=layout)
        with strategy.scope():
            model = SimCLIC(config, (8, 8, 1), 64)
            model.compile(optimizer=build_optimizer(config, 4))
        with undone(model):
            before = copies(model)
            model.fit(data, epochs=1, steps_per_epoch=3, verbose=0)
            timed = copies(model)
        restored = copies(model)
        model.fit_to_length(2, 4)
        recorder = MixRecorder()
        model.fit(data, epochs=2, steps_per_epoch=4, verbose=0, callbacks=[recorder])
        results[layout] = {"moved": largest_change(before, timed),
                           "left": largest_change(before, restored), "mixes": recorder.mixes}
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
