"""Helper of tests/test_distribute.py, run as a subprocess (it configures two
logical CPU devices, which must happen before TensorFlow initialises them):

    python tests/distributed_step.py OUT.json [--jit] [--precision P] [--perturbation P]
                                     [--bank-layout L]

Trains the same tiny SimCLIC model for two steps on the same global batches
once on one device and once under a MirroredStrategy over two logical CPUs,
and writes what the test compares: per-step losses, the loss of an
evaluation pass, weights, history rows (the logical buffer, each replica's
copy or shard, and the buffer after a `.keras` round trip from the mirrored
model to one device and from the single-device model to the mirrored
strategy).
"""

import argparse
import json
import os

import two_logical_cpus  # noqa: F401 (first: before TensorFlow starts)
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

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


def network_weights(model):
    """The model's weights outside the perturbation, whose history buffer may
    be sharded (another shape on each layout)."""
    history = {id(weight) for weight in model.perturbation.weights}
    return [weight for weight in model.weights if id(weight) not in history]


def train(config, strategy, initial_weights):
    distribute.set_precision(config.precision)
    with strategy.scope():
        model = SimCLIC(config, (SIDE, SIDE, 3), N)
        model.compile(optimizer=build_optimizer(config, steps_per_epoch=2), jit_compile=config.jit)
    for weight, value in zip(network_weights(model), initial_weights):
        weight.assign(value)
    rng = np.random.default_rng(1)
    views = rng.random((2, 2, B, SIDE, SIDE, 3), dtype="float32")
    indices = np.array(STEP_INDICES, "int32")
    data = tf.data.Dataset.from_tensor_slices(((views[:, 0], views[:, 1]), indices))
    logger = StepLogger()
    model.fit(data, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    # In inference the history layer reads the rows (on every shard) and writes none.
    result = {"logs": logger.logs, "eval_loss": model.evaluate(data, verbose=0)[0],
              "weights": [w.numpy().tolist() for w in network_weights(model)]}
    if config.perturbation == "history":
        result.update(history_state(model.perturbation))
        copies = strategy.experimental_local_results(model.perturbation.bank.value)
        result["replica_banks"] = [np.asarray(c.numpy(), "float32").tolist() for c in copies]
    return model, result


def history_state(layer):
    """The logical history buffer and visit counts of a history layer, as
    lists, and the rows of each replica's copy."""
    return {"bank": layer.bank_rows().astype("float32").tolist(),
            "visits": layer.visit_counts().tolist(), "rows": layer.bank.shape[0]}


def round_trip(model, path, strategy):
    """The history state of `model` saved to `path` and loaded under `strategy`."""
    model.save(path)
    with strategy.scope():
        loaded = keras.models.load_model(path, safe_mode=True)
    return history_state(loaded.perturbation)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--jit", action="store_true")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--perturbation", default="history")
    parser.add_argument("--no-sync-bn", action="store_true")
    parser.add_argument("--bank-layout", default="auto")
    args = parser.parse_args()
    config = SimCLICConfig(backbone="tiny_convnet", width=4, proj_dim=16, pred_hidden=8,
                           batch_size=B, epochs=1, perturbation=args.perturbation,
                           sync_bn=not args.no_sync_bn, jit=args.jit,
                           precision=args.precision, kernel_impl="tf",
                           bank_layout=args.bank_layout)
    keras.utils.set_random_seed(0)
    start_weights = [w.numpy() for w in network_weights(SimCLIC(config, (SIDE, SIDE, 3), N))]
    keras.utils.set_random_seed(0)
    one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
    single, single_result = train(config, one_device, start_weights)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    model, mirrored_result = train(config, mirrored, start_weights)
    result = {"single": single_result, "mirrored": mirrored_result,
              "replicas": mirrored.num_replicas_in_sync}
    if config.perturbation == "history":
        folder = os.path.dirname(os.path.abspath(args.out))
        result["mirrored_on_one_device"] = round_trip(
            model, os.path.join(folder, "mirrored.keras"), one_device)
        result["single_on_mirrored"] = round_trip(
            single, os.path.join(folder, "single.keras"), mirrored)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
