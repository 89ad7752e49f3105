"""Training-step time of each perturbation against SimSiam (`none`), on the
same model and batch, in one process; prints the ratios (target <= 1.02).

    python benchmarks/step_overhead.py --width 16 --batch-size 128

Each model runs its compiled Keras train function; the models take turns
for `--rounds` rounds of `--steps` steps so that machine noise hits them all
alike, and the median round is reported.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from simclic_tf import SimCLIC, SimCLICConfig, build_optimizer  # noqa: E402
from simclic_tf.registry import PERTURBATIONS  # noqa: E402


def train_function(config, images, num_samples):
    """The model's compiled train function and a dataset iterator that feeds
    it the same batch with fresh indices, as in real training."""
    keras.utils.set_random_seed(0)
    model = SimCLIC(config, images.shape[1:], num_samples)
    model.compile(optimizer=build_optimizer(config, 100))
    batch = len(images)
    indices = tf.data.Dataset.range(num_samples).shuffle(num_samples).batch(batch, True)
    views = (images,) * config.views
    data = indices.map(lambda i: (views, tf.cast(i, tf.int32))).repeat()
    model.make_train_function()
    return model.train_function, iter(data)


def step_seconds(configs, images, num_samples, steps=5, rounds=7):
    """{name: median seconds per training step} of each config in `configs`
    ({name: SimCLICConfig}) on the batch `images`. The models take turns for
    `rounds` rounds of `steps` steps, so that machine noise hits them alike."""
    functions = {}
    for name, config in configs.items():
        functions[name] = train_function(config, images, num_samples)
        step, iterator = functions[name]
        step(iterator)  # trace and warm up
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, (step, iterator) in functions.items():
            start = time.perf_counter()
            for _ in range(steps):
                logs = step(iterator)
            float(logs["loss"])  # wait for the device
            times[name].append((time.perf_counter() - start) / steps)
    return {name: float(np.median(samples)) for name, samples in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18_cifar")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=50000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = rng.random((args.batch_size, args.image_size, args.image_size, 3), "float32")
    configs = {name: SimCLICConfig(backbone=args.backbone, width=args.width, perturbation=name,
                                   batch_size=args.batch_size)
               for name in PERTURBATIONS.names()}
    times = step_seconds(configs, images, args.num_samples, args.steps, args.rounds)
    baseline = times["none"]
    print(f"{args.backbone} width {args.width}, batch {args.batch_size}, "
          f"{args.image_size}x{args.image_size}, history rows {args.num_samples}, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'perturbation':<16}{'ms/step':>10}{'ratio to none':>16}")
    for name, median in times.items():
        print(f"{name:<16}{1000 * median:>10.1f}{median / baseline:>16.3f}")


if __name__ == "__main__":
    main()
