"""The collapse signals on healthy runs and on SimSiam without stop-gradient,
and what z_rank costs per training step.

    python benchmarks/collapse_signal.py                      # tiny model, seeds 0-2
    python benchmarks/collapse_signal.py --default-epochs 3   # also the default job's model

For each seed, with and without stop-gradient: the final epoch's z_std and
z_rank, kNN accuracy on digits, and whether `CollapseMonitor` calls it a
collapse. The tiny model is the tests' (tiny_convnet width 4, 32-d, batch
64, base lr 1.0, 8 epochs on digits); `--default-epochs N` adds the default
job's model (width-16 ResNet-18, 512-d, batch 128) on shapes for N epochs.
Then the time of z_rank's SVD on one batch of z against a training step of
the default model (`step_overhead.step_seconds`).
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from simclic_tf import SimCLICConfig, sources  # noqa: E402
from simclic_tf.callbacks import CollapseMonitor  # noqa: E402
from simclic_tf.evaluation import evaluate_backbone, labelled_memory  # noqa: E402
from simclic_tf.model import effective_rank  # noqa: E402
from simclic_tf.training import build_pretraining  # noqa: E402
from step_overhead import step_seconds  # noqa: E402

TINY = dict(dataset="digits", backbone="tiny_convnet", width=4, proj_dim=32, pred_hidden=8,
            batch_size=64, knn_k=20, perturbation="none", base_lr=1.0, epochs=8)


def final_signals(config):
    """(final epoch's logs, kNN accuracy) of pretraining `config`."""
    keras.utils.set_random_seed(config.seed)
    train_set, test_set = sources.load_train_and_eval(config)
    pretraining = build_pretraining(config, train_set)
    model = pretraining.model
    history = pretraining.fit(verbose=0)
    memory, queries = labelled_memory(train_set, test_set, config.seed)
    knn = evaluate_backbone(model.backbone, memory, queries, config)["knn_accuracy"]
    return {name: values[-1] for name, values in history.history.items()}, knn


def rank_seconds(batch, dim, repeats=50):
    """Median seconds of one compiled effective_rank on a (batch, dim) z."""
    z = tf.random.normal((batch, dim))
    rank = tf.function(effective_rank)
    rank(z).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rank(z).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--default-epochs", type=int, default=0,
                        help="also the default job's model on shapes for this many epochs")
    args = parser.parse_args()

    models = [("tiny", SimCLICConfig(**TINY, knn_every=0, linear_epochs=0))]
    if args.default_epochs:
        models.append(("default", SimCLICConfig(epochs=args.default_epochs, knn_every=0,
                                                linear_epochs=0)))
    print(f"{'model':<8}{'seed':>5}{'stop-grad':>10}{'z_std':>9}{'z_rank':>8}{'kNN %':>7}"
          f"  collapsed")
    for label, base in models:
        monitor = CollapseMonitor(base.proj_dim)
        for seed in args.seeds if label == "tiny" else args.seeds[:1]:
            for stop_gradient in (True, False):
                logs, knn = final_signals(base.replace(seed=seed, stop_gradient=stop_gradient))
                print(f"{label:<8}{seed:>5}{'on' if stop_gradient else 'off':>10}"
                      f"{logs['z_std']:>9.4f}{logs['z_rank']:>8.3f}{100 * knn:>7.1f}  "
                      f"{'yes' if monitor.is_collapsed(logs) else 'no'}")
    print(f"alarm: {CollapseMonitor(512).describe()} (z_std's for 512-d)")

    config = SimCLICConfig()
    images = np.random.default_rng(0).random((config.batch_size, 32, 32, 3), "float32")
    step = step_seconds({"default": config}, images, 50000)["default"]
    rank = rank_seconds(config.batch_size, config.proj_dim)
    print(f"z_rank of a {config.batch_size} x {config.proj_dim} batch: {1000 * rank:.2f} ms, "
          f"{100 * rank / step:.1f} % of the default model's {1000 * step:.0f} ms training step "
          "(32 x 32 images)")


if __name__ == "__main__":
    main()
