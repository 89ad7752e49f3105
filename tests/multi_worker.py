"""Helper of tests/test_distribute.py: one worker of a MultiWorkerMirroredStrategy
cluster (TF_CONFIG in the environment; without it, a single worker on the
default strategy). Trains the tiny model on digits for --steps steps and
saves to OUT.npz the logical history buffer and visit counts (`bank_rows`,
`visit_counts`: assembled from the shards with --bank-layout sharded), its
own copy or shard of the buffer, and the loss of every step; and the model
to OUT.keras.

    TF_CONFIG=... python tests/multi_worker.py OUT.npz [--steps 6] [--bank-layout L]
                                               [--fixed-batches]

--fixed-batches trains on precomputed global batches of random pixels (the
same in every process) instead of the augmented digits, so that a cluster
and a single-device run see the same global batches.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simclic_tf import distribute  # noqa: E402


def fixed_batches(num_samples, image_shape, steps, batch_size, seed):
    """`steps` global batches `((view1, view2), indices)` of random pixels,
    each repeating its first index in its second half. A dataset of whole
    global batches with the DATA auto-shard policy: tf.distribute rebatches
    each into one slice per replica and gives worker r slice r (the halves, in
    worker order), as one device sees the batch."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    views = rng.random((2, steps, batch_size, *image_shape), dtype="float32")
    indices = rng.integers(0, num_samples, (steps, batch_size), dtype="int32")
    indices[:, batch_size // 2] = indices[:, 0]
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return tf.data.Dataset.from_tensor_slices(((views[0], views[1]), indices)).with_options(
        options)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--bank-layout", default="auto")
    parser.add_argument("--fixed-batches", action="store_true")
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

    from simclic_tf import augment, pipelines, sources
    from simclic_tf.config import SimCLICConfig
    from simclic_tf.training import build_model

    config = SimCLICConfig(dataset="digits", backbone="tiny_convnet", width=4, proj_dim=16,
                           precision="float32",  # compared with one device to 1e-4
                           pred_hidden=8, batch_size=32, epochs=1, sync_bn=True, kernel_impl="tf",
                           strategy="multi_worker", bank_layout=args.bank_layout)
    keras.utils.set_random_seed(config.seed)
    train_set, _ = sources.load_train_and_eval(config)
    if args.fixed_batches:
        pretrain = fixed_batches(len(train_set), train_set.image_shape, args.steps,
                                 config.batch_size, config.seed)
    else:
        augmentation = augment.build_augmentation(
            train_set.images.shape[1:3], train_set.images.shape[-1], seed=config.seed)
        pretrain = pipelines.pretrain_dataset(train_set.images, config.batch_size, config.views,
                                              augmentation, seed=config.seed).take(args.steps)
    model = build_model(config, train_set, strategy)
    losses = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: losses.append(
        np.asarray(logs["loss"]).reshape(-1)[0]))
    model.fit(pretrain, epochs=1, verbose=0, callbacks=[record])
    layer = model.perturbation
    np.savez(args.out, bank=layer.bank_rows(), visits=layer.visit_counts(),
             shard=layer.bank.numpy(), losses=losses,
             replicas=strategy.num_replicas_in_sync, seconds=time.time() - start)
    model.save(os.path.splitext(args.out)[0] + ".keras")  # Every worker, as outputs.export.
    return 0


if __name__ == "__main__":
    sys.exit(main())
