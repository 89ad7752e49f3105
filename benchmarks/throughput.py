"""Training throughput (images/second) of SimCLIC `history` against SimSiam
(`none`) for each compute precision and XLA (jit) on/off, on synthetic data
and on the shared CIFAR-10 file through the real augmentation pipeline.

    python benchmarks/throughput.py                      # the defaults below
    python benchmarks/throughput.py --precisions mixed_bfloat16 --jit on \\
        --steps 50 --data synthetic --out runs/throughput

What is timed is what `train.py` runs: each model comes from
`simclic_tf.training.build_model` (policy, model, optimizer and jit under the
strategy), and a step is a call of its compiled Keras train function
(`model.make_train_function()`) on a dataset iterator, as in `model.fit`.
One model is built per (precision, jit, perturbation) and timed on every
`--data` source in turn (same element spec, so the compiled step is reused);
the first call on each source (trace and compile) is reported apart as
`first_call_s`, then `--warmup-steps - 1` more untimed steps run. The two
perturbations of a (precision, jit) pair then take turns for `--rounds`
rounds of `--steps` steps and the median round is reported:
images/second = batch * steps / seconds, and `ratio` = the history step time
over the SimSiam step time of the same precision, jit and data (1.02: 2 %
slower). An image is one sample of the batch (two augmented views each).

`synthetic` feeds one fixed batch of random views with fresh shuffled indices
(the device's speed, no input pipeline); `npz:PATH` runs
`simclic_tf.pipelines.pretrain_dataset` with SimSiam's augmentation on the images
of PATH (includes the CPU input pipeline). The history bank has one row per
image of the npz file (or `--num-samples` rows).

`--budget-s` (0: none) skips a (precision, jit) pair when the time taken so
far plus the longest earlier pair of the same jit setting would pass it;
skipped pairs are listed with the flags that run them. The table is
rewritten as `throughput.csv` in `--out` after every pair, so a run that is
stopped keeps what it measured.
"""

import argparse
import csv
import gc
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from simclic_tf import kernels  # noqa: E402
from simclic_tf import augment, pipelines  # noqa: E402
from simclic_tf.config import SimCLICConfig, field_choices  # noqa: E402
from simclic_tf.images import ImageSet  # noqa: E402
from simclic_tf.sources import load_images  # noqa: E402
from simclic_tf.training import build_model  # noqa: E402

PRECISIONS = field_choices("precision")
PERTURBATIONS = ("none", "history")
COLUMNS = ("precision", "jit", "data", "perturbation", "ms_per_step", "images_per_s",
           "ratio", "first_call_s", "build_s", "steps", "rounds", "batch_size", "width",
           "kernel_impl", "device")


def csv_list(choices):
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"{text!r}: choose a comma-separated list of {', '.join(choices)}")
        return values
    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds (the median is reported)")
    parser.add_argument("--warmup-steps", type=int, default=5,
                        help="untimed steps per model and data source, the first of "
                             "which traces and compiles")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--backbone", default="resnet18_cifar")
    parser.add_argument("--data", action="append", default=None,
                        help="synthetic or npz:PATH; repeat for several (default: "
                             "synthetic and npz:../shared/data/cifar10_train_10k.npz)")
    parser.add_argument("--precisions", type=csv_list(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--jit", type=csv_list(("on", "off")), default=["on", "off"],
                        help="on, off or on,off")
    parser.add_argument("--perturbation", default="history",
                        help="compared against none (SimSiam)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="history bank rows (default: the npz file's images, "
                             "else 50000)")
    parser.add_argument("--kernel-impl", default="auto", choices=kernels.IMPLEMENTATIONS)
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="skip pairs that would end after this many seconds (0: none)")
    parser.add_argument("--out", default="runs/throughput")
    args = parser.parse_args(argv)
    args.data = args.data or ["synthetic", "npz:../shared/data/cifar10_train_10k.npz"]
    for source in args.data:
        if source != "synthetic" and not source.startswith("npz:"):
            parser.error(f"--data {source!r}: choose synthetic or npz:PATH")
    if args.steps < 1 or args.rounds < 1 or args.warmup_steps < 1:
        parser.error("--steps, --rounds and --warmup-steps must be at least 1")
    return args


def device_name():
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"{len(gpus)} x {details.get('device_name', 'GPU')}"


def synthetic_dataset(batch_size, image_shape, num_samples):
    """One fixed batch of two random views, with fresh shuffled indices each step."""
    rng = np.random.default_rng(0)
    views = tuple(tf.constant(rng.random((batch_size,) + image_shape, "float32"))
                  for _ in range(2))
    indices = tf.data.Dataset.range(num_samples).shuffle(num_samples, seed=0)
    return (indices.batch(batch_size, drop_remainder=True).repeat()
            .map(lambda i: (views, tf.cast(i, tf.int32))).prefetch(2))


def npz_dataset(images, batch_size):
    """The real pretraining pipeline: SimSiam's augmentation, two views."""
    augmentation = augment.build_augmentation(images.shape[1:3], images.shape[-1], seed=0)
    return pipelines.pretrain_dataset(images, batch_size, 2, augmentation, seed=0).repeat()


def sync(logs):
    float(logs["loss"])  # Waits for the device.


def time_pair(functions, iterators, args):
    """Median seconds per step of each model, the models taking turns."""
    samples = {name: [] for name in functions}
    for _ in range(args.rounds):
        for name, step in functions.items():
            iterator = iterators[name]
            start = time.perf_counter()
            for _ in range(args.steps):
                logs = step(iterator)
            sync(logs)
            samples[name].append((time.perf_counter() - start) / args.steps)
    return {name: statistics.median(values) for name, values in samples.items()}


def run_pair(precision, jit, sources, train_set, args, info):
    """The rows of one (precision, jit) pair: every perturbation on every source."""
    models, functions, build_s = {}, {}, {}
    for name in ("none", args.perturbation):
        keras.mixed_precision.set_global_policy("float32")
        keras.utils.set_random_seed(0)
        config = SimCLICConfig(backbone=args.backbone, width=args.width, perturbation=name,
                               batch_size=args.batch_size, precision=precision,
                               jit=(jit == "on"), kernel_impl=args.kernel_impl,
                               strategy="default")
        start = time.perf_counter()
        models[name] = build_model(config, train_set)
        models[name].make_train_function()
        functions[name] = models[name].train_function
        build_s[name] = time.perf_counter() - start
    rows = []
    for source, dataset in sources.items():
        iterators, first_call = {}, {}
        for name, step in functions.items():
            iterators[name] = iter(dataset)
            start = time.perf_counter()
            logs = step(iterators[name])
            sync(logs)
            first_call[name] = time.perf_counter() - start
            for _ in range(args.warmup_steps - 1):
                logs = step(iterators[name])
            sync(logs)
        seconds = time_pair(functions, iterators, args)
        for name in functions:
            rows.append({
                "precision": precision, "jit": jit, "data": source, "perturbation": name,
                "ms_per_step": round(1000 * seconds[name], 3),
                "images_per_s": round(args.batch_size / seconds[name], 1),
                "ratio": round(seconds[name] / seconds["none"], 3),
                "first_call_s": round(first_call[name], 1),
                "build_s": round(build_s[name], 1),
                "steps": args.steps, "rounds": args.rounds, "batch_size": args.batch_size,
                "width": args.width, **info})
        del iterators
    del models, functions
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("float32")
    gc.collect()
    return rows


def print_table(rows, file=sys.stdout):
    header = (f"{'precision':<16}{'jit':<5}{'data':<34}{'perturbation':<14}"
              f"{'ms/step':>9}{'images/s':>11}{'ratio':>8}{'1st call s':>12}")
    print(header, file=file)
    print("-" * len(header), file=file)
    for r in rows:
        data_name = r["data"] if len(r["data"]) <= 33 else "..." + r["data"][-30:]
        print(f"{r['precision']:<16}{r['jit']:<5}{data_name:<34}{r['perturbation']:<14}"
              f"{r['ms_per_step']:>9.2f}{r['images_per_s']:>11.1f}{r['ratio']:>8.3f}"
              f"{r['first_call_s']:>12.1f}", file=file)


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None):
    began = time.perf_counter()
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "throughput.csv")

    npz_sets = {s: load_images(s) for s in args.data if s.startswith("npz:")}
    shapes = {tuple(d.images.shape[1:]) for d in npz_sets.values()}
    if len(shapes) > 1:
        sys.exit(f"--data: the npz files differ in image shape {sorted(shapes)}")
    image_shape = shapes.pop() if shapes else (32, 32, 3)
    largest = max((len(d) for d in npz_sets.values()), default=0)
    num_samples = args.num_samples or largest or 50000
    if num_samples < largest:
        sys.exit(f"--num-samples {num_samples} is smaller than an npz file ({largest} images)")
    # build_model reads the bank size and image shape from the training set.
    train_set = ImageSet(np.zeros((num_samples,) + image_shape, np.uint8), None, [])
    sources = {}
    for source in args.data:
        sources[source] = (synthetic_dataset(args.batch_size, image_shape, num_samples)
                           if source == "synthetic"
                           else npz_dataset(npz_sets[source].images, args.batch_size))

    start = time.perf_counter()
    kernel_impl = kernels.select(args.kernel_impl).name  # Builds the C++ ops (first use).
    info = {"kernel_impl": kernel_impl, "device": device_name()}
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {info['device']}; "
          f"kernels: {kernel_impl} (--kernel-impl {args.kernel_impl}, "
          f"{time.perf_counter() - start:.1f} s to select)", flush=True)
    print(f"{args.backbone} width {args.width}, batch {args.batch_size}, "
          f"{'x'.join(map(str, image_shape))}, two views, history rows {num_samples}; "
          f"median of {args.rounds} rounds x {args.steps} steps after "
          f"{args.warmup_steps} warm-up steps", flush=True)

    rows, skipped, durations = [], [], {}
    for precision in args.precisions:
        for jit in args.jit:
            elapsed = time.perf_counter() - began
            estimate = max(durations.get(jit, []) or
                           [max(d) for d in durations.values()] or [0.0])
            if args.budget_s and elapsed + estimate > args.budget_s:
                skipped.append((precision, jit))
                print(f"[{elapsed:6.0f} s] skip {precision} jit {jit}: about {estimate:.0f} s "
                      f"would pass --budget-s {args.budget_s:.0f}", flush=True)
                continue
            print(f"[{elapsed:6.0f} s] {precision} jit {jit} ...", flush=True)
            pair_start = time.perf_counter()
            new_rows = run_pair(precision, jit, sources, train_set, args, info)
            durations.setdefault(jit, []).append(time.perf_counter() - pair_start)
            rows += new_rows
            write_csv(rows, csv_path)
            print_table(new_rows)
            print(f"          {durations[jit][-1]:.0f} s for this pair", flush=True)

    print(f"\nAll measured pairs ({time.perf_counter() - began:.0f} s in all); ratio = "
          f"step time over the SimSiam (none) step of the same precision, jit and data:\n")
    print_table(rows)
    with open(os.path.join(args.out, "throughput.txt"), "w") as f:
        print_table(rows, file=f)
    print(f"\nCSV: {csv_path}")
    if skipped:
        print("Skipped for --budget-s: " + ", ".join(f"{p} jit {j}" for p, j in skipped))
        for p, j in skipped:
            print(f"  run with: --precisions {p} --jit {j}")


if __name__ == "__main__":
    main()
