"""Helper of tests/test_distribute.py: one worker of a MultiWorkerMirroredStrategy
cluster (TF_CONFIG; without it, one worker on the default strategy) pretrains
the tiny model on digits for --epochs whole epochs through `simclic train`'s
input (`training.pretrain_inputs`), recording the indices of every batch its
replica trains on, and saves them with its history visit counts to OUT.npz.

    TF_CONFIG=... python tests/multi_worker_input.py OUT.npz [--epochs 2]
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simclic_tf import distribute  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    # First: MultiWorkerMirroredStrategy must exist before other TF work.
    strategy = distribute.make_strategy(
        "multi_worker" if "TF_CONFIG" in os.environ else "default")
    import keras
    import numpy as np
    import tensorflow as tf

    from simclic_tf import sources
    from simclic_tf.config import SimCLICConfig
    from simclic_tf.model import SimCLIC
    from simclic_tf.training import build_model, pretrain_inputs

    trained = []
    train_step = SimCLIC.train_step

    def recording(self, batch):
        record = tf.py_function(lambda indices: trained.append(indices.numpy()),
                                [batch[1]], [])
        with tf.control_dependencies([record]):
            return train_step(self, batch)

    SimCLIC.train_step = recording
    config = SimCLICConfig(dataset="digits", backbone="tiny_convnet", width=4, proj_dim=16,
                           precision="float32",  # compared with one device to 1e-4
                           pred_hidden=8, batch_size=32, epochs=args.epochs, kernel_impl="tf",
                           strategy="multi_worker", jit=False)
    keras.utils.set_random_seed(config.seed)
    train_set, _ = sources.load_train_and_eval(config)
    _, pretrain = pretrain_inputs(config, train_set, strategy)
    model = build_model(config, train_set, strategy)
    model.fit(pretrain, epochs=config.epochs, steps_per_epoch=config.epoch_steps(len(train_set)),
              verbose=0)
    np.savez(args.out, trained=np.stack(trained), visits=model.perturbation.visit_counts(),
             replicas=strategy.num_replicas_in_sync)
    return 0


if __name__ == "__main__":
    sys.exit(main())
