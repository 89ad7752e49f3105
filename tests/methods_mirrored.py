"""Helper of tests/test_methods.py, run as a subprocess (two logical CPU
devices): the rival methods under a MirroredStrategy over both, against one
device on the same global batches, written as JSON.

    python tests/methods_mirrored.py OUT.json

* "nt_xent": the loss of one global batch and its gradient with respect to
  p and t on one device, and each replica's loss (its half of the anchors
  against every replica's negatives) and gradient of its rows.
* "byol_nn" and "simclr": two training steps of a tiny model (`--sync-bn`,
  so that one device and two replicas compute the same statistics), BYOL's
  momentum target with the nearest_neighbour perturbation, and SimCLR: the
  losses, the weights (target encoder and support queue included) and each
  replica's copy of the target encoder and queue.
"""

import json
import sys

import two_logical_cpus  # noqa: F401 (first: before TensorFlow starts)
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

from simclic_tf import SimCLIC, SimCLICConfig, build_optimizer  # noqa: E402
from simclic_tf.losses import nt_xent  # noqa: E402

N, B, SIDE = 16, 8, 8
STEP_INDICES = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]


def nt_xent_on_both(strategy):
    """NT-Xent of one global batch on one device and on two replicas."""
    rng = np.random.default_rng(0)
    p, t = (rng.normal(size=(B, 6)).astype("float32") for _ in range(2))

    def loss_and_gradients(p, t):
        p, t = tf.convert_to_tensor(p), tf.convert_to_tensor(t)
        with tf.GradientTape() as tape:
            tape.watch([p, t])
            loss = nt_xent(p, t, temperature=0.3)
        return loss, tape.gradient(loss, [p, t])

    loss, (grad_p, grad_t) = loss_and_gradients(p, t)
    halves = strategy.experimental_distribute_values_from_function(
        lambda context: (p[context.replica_id_in_sync_group * B // 2:][:B // 2],
                         t[context.replica_id_in_sync_group * B // 2:][:B // 2]))
    losses, grads = tf.function(lambda pt: strategy.run(loss_and_gradients, args=pt))(halves)
    local = strategy.experimental_local_results
    return {"single": {"loss": float(loss), "grad_p": grad_p.numpy().tolist(),
                       "grad_t": grad_t.numpy().tolist()},
            "replica_losses": [float(x) for x in local(losses)],
            # Each replica's gradient of its own loss: the global loss is their mean.
            "replica_grad_p": np.concatenate([g.numpy() for g in local(grads[0])]).tolist(),
            "replica_grad_t": np.concatenate([g.numpy() for g in local(grads[1])]).tolist()}


class StepLogger(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def train(config, strategy, initial_weights):
    with strategy.scope():
        model = SimCLIC(config, (SIDE, SIDE, 3), N)
        model.compile(optimizer=build_optimizer(config, steps_per_epoch=2))
    for weight, value in zip(model.weights, initial_weights):
        weight.assign(value)
    rng = np.random.default_rng(1)
    views = rng.random((2, 2, B, SIDE, SIDE, 3), dtype="float32")
    data = tf.data.Dataset.from_tensor_slices(
        ((views[:, 0], views[:, 1]), np.array(STEP_INDICES, "int32")))
    logger = StepLogger()
    model.fit(data, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    copies = {}
    if config.target_momentum:
        copies["target"] = [[c.numpy().tolist() for c in strategy.experimental_local_results(
            w.value)] for w in model.target_backbone.weights + model.target_projector.weights]
    if config.perturbation == "nearest_neighbour":
        copies["queue"] = [c.numpy().tolist() for c in strategy.experimental_local_results(
            model.perturbation.queue.value)]
    return {"losses": logger.losses, "weights": [w.numpy().tolist() for w in model.weights],
            "paths": [w.path for w in model.weights], "copies": copies}


def both(config, mirrored):
    keras.utils.set_random_seed(0)
    start = [w.numpy() for w in SimCLIC(config, (SIDE, SIDE, 3), N).weights]
    return {"single": train(config, tf.distribute.OneDeviceStrategy("/cpu:0"), start),
            "mirrored": train(config, mirrored, start)}


def main():
    tiny = SimCLICConfig(backbone="tiny_convnet", width=4, proj_dim=16, pred_hidden=8,
                         batch_size=B, epochs=1, sync_bn=True, kernel_impl="tf",
                         precision="float32")
    # One strategy for all: two in a process would reuse collective instance keys.
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    result = {
        "nt_xent": nt_xent_on_both(mirrored),
        "byol_nn": both(tiny.for_method("byol", perturbation="nearest_neighbour",
                                        queue_size=12, target_momentum=0.9), mirrored),
        "simclr": both(tiny.for_method("simclr"), mirrored),
    }
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
