"""Helper of tests/test_distribute.py, run as a subprocess (it configures two
logical CPU devices, which must happen before TensorFlow initialises them):

    python tests/distributed_step.py OUT.json [--jit] [--precision P] [--perturbation P]

Trains the same tiny SimCLIC model for two steps on the same global batches
once on one device and once under a MirroredStrategy over two logical CPUs,
and writes what the test compares: per-step losses, weights, history rows.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simclic_tf import SimCLIC, SimCLICConfig, build_optimizer, distribute  # noqa: E402

N, B, SIDE = 16, 8, 8
# Step 2 repeats rows of step 1 and holds index 4 on both replicas (4 + 4 split).
STEP_INDICES = [[0, 1, 2, 3, 4, 5, 6, 7], [4, 5, 6, 7, 4, 9, 10, 3]]


class StepLogger(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append({k: float(v) for k, v in logs.items()})


def train(config, strategy, initial_weights):
    distribute.set_precision(config.precision)
    with strategy.scope():
        model = SimCLIC(config, (SIDE, SIDE, 3), N)
        model.compile(optimizer=build_optimizer(config, steps_per_epoch=2), jit_compile=config.jit)
    if initial_weights is not None:
        model.set_weights(initial_weights)
    rng = np.random.default_rng(1)
    views = rng.random((2, 2, B, SIDE, SIDE, 3), dtype="float32")
    indices = np.array(STEP_INDICES, "int32")
    data = tf.data.Dataset.from_tensor_slices(((views[:, 0], views[:, 1]), indices))
    logger = StepLogger()
    model.fit(data, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    bank = model.perturbation.bank if config.perturbation == "history" else None
    result = {"logs": logger.logs, "weights": [w.tolist() for w in model.get_weights()]}
    if bank is not None:
        result["bank"] = bank.numpy().astype("float32").tolist()
        result["visits"] = model.perturbation.visits.numpy().tolist()
        inner = bank._value
        copies = strategy.experimental_local_results(inner)
        result["replica_banks"] = [np.asarray(c.numpy(), "float32").tolist() for c in copies]
    return model, result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--jit", action="store_true")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--perturbation", default="history")
    parser.add_argument("--no-sync-bn", action="store_true")
    args = parser.parse_args()
    config = SimCLICConfig(backbone="tiny_convnet", width=4, proj_dim=16, pred_hidden=8,
                           batch_size=B, epochs=1, perturbation=args.perturbation,
                           sync_bn=not args.no_sync_bn, jit=args.jit,
                           precision=args.precision, kernel_impl="tf")
    keras.utils.set_random_seed(0)
    start_weights = SimCLIC(config, (SIDE, SIDE, 3), N).get_weights()
    keras.utils.set_random_seed(0)
    _, single_result = train(config, tf.distribute.OneDeviceStrategy("/cpu:0"), start_weights)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    _, mirrored_result = train(config, mirrored, start_weights)
    with open(args.out, "w") as f:
        json.dump({"single": single_result, "mirrored": mirrored_result,
                   "replicas": mirrored.num_replicas_in_sync}, f)


if __name__ == "__main__":
    main()
