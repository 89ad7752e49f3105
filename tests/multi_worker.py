"""Helper of tests/test_distribute.py: one worker of a MultiWorkerMirroredStrategy
cluster (TF_CONFIG in the environment; without it, a single worker on the
default strategy). Trains the tiny model on digits for --steps steps and
saves its copy of the history buffer and visit counts to OUT.npz.

    TF_CONFIG=... python tests/multi_worker.py OUT.npz [--steps 6]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simclic_tf import distribute  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    start = time.time()
    # First: MultiWorkerMirroredStrategy must exist before other TF work.
    strategy = distribute.make_strategy(
        "multi_worker" if "TF_CONFIG" in os.environ else "default")
    import keras
    keras.config.disable_traceback_filtering()
    import tensorflow as tf
    tf.debugging.disable_traceback_filtering()
    import numpy as np

    from simclic_tf import augment, data
    from simclic_tf.config import SimCLICConfig
    from simclic_tf.run import build_model

    config = SimCLICConfig(dataset="digits", backbone="tiny_convnet", width=4, proj_dim=16,
                           pred_hidden=8, batch_size=32, epochs=1, sync_bn=True, kernel_impl="tf",
                           strategy="multi_worker")
    keras.utils.set_random_seed(config.seed)
    train_set, _ = data.load_train_and_eval(config)
    augmentation = augment.build_augmentation(
        train_set.images.shape[1:3], train_set.images.shape[-1], seed=config.seed)
    pretrain = data.pretrain_dataset(train_set.images, config.batch_size, config.views,
                                     augmentation, seed=config.seed)
    model = build_model(config, train_set, strategy)
    history = model.fit(pretrain.take(args.steps), epochs=1, verbose=0)
    np.savez(args.out, bank=model.perturbation.bank.numpy(),
             visits=model.perturbation.visits.numpy(),
             loss=history.history["loss"][-1],
             replicas=strategy.num_replicas_in_sync, seconds=time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
