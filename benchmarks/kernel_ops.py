"""The C++ custom ops against the TensorFlow-function kernels, in one process;
prints median times and ratios (never asserted by tests).

    python benchmarks/kernel_ops.py --rounds 7

(a) each kernel alone, eager / tf.function / jit: the history exchange on an
    N = 50,000 x d = 2,048 bank (float32 and bfloat16) with B = 256 rows, and
    the representation noise on a 256 x 2,048 batch; ratio custom_op / tf.
(b) step overhead: a SimCLIC training step (benchmarks/step_overhead.py's
    compiled Keras train function) with the history and the noise
    perturbation, each implementation, against perturbation `none`.
(c) the history step with a 50,000-row and a 1,281,167-row (ImageNet)
    bfloat16 bank, each implementation, and the ratio large / small. The
    TensorFlow functions inside a jit-compiled step on CPU convert a bfloat16
    bank to float32 and back around XLA's scatter (kernels/history.py), about
    10 bytes per bank element of temporaries: that run is skipped, and said so,
    when it would not fit in half the available memory.
"""

import argparse
import gc
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from simclic_tf import kernels  # noqa: E402
from simclic_tf import SimCLICConfig  # noqa: E402
from step_overhead import train_function  # noqa: E402  (benchmarks/ is sys.path[0])

IMPLS = ("tf", "custom_op")
MODES = ("eager", "function", "jit")
IMAGENET_ROWS = 1_281_167


def median_ms(samples):
    return 1000 * float(np.median(samples))


def time_interleaved(calls, rounds, steps):
    """Median seconds per call of each named callable, taking turns per round."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(steps):
                result = call()
            np.asarray(result)  # Wait for the value.
            times[name].append((time.perf_counter() - start) / steps)
    return times


def print_ratio_table(title, times, baseline_of):
    print(f"\n{title}")
    print(f"{'':<34}{'ms':>10}{'ratio':>10}")
    for name, samples in times.items():
        base = baseline_of(name)
        ratio = np.median(samples) / np.median(times[base]) if base else float("nan")
        print(f"{name:<34}{median_ms(samples):>10.3f}{ratio:>10.2f}")


def kernels_alone(args):
    rng = np.random.default_rng(0)
    n, d, b = args.rows, args.dim, args.batch
    selected = {impl: kernels.select(impl) for impl in IMPLS}
    for dtype in ("float32", "bfloat16"):
        bank = tf.Variable(tf.zeros([n, d], dtype))
        visits = tf.Variable(tf.zeros([n], tf.int32))
        values = tf.constant(rng.normal(size=(b, d)).astype(np.float32))
        batches = [tf.constant(rng.choice(n, b, replace=False).astype(np.int32))
                   for _ in range(16)]
        calls = {}
        for impl in IMPLS:
            fn = selected[impl].history_exchange
            for mode in MODES:
                wrapped = fn if mode == "eager" else tf.function(fn, jit_compile=mode == "jit")
                counter = iter(range(1 << 62))

                def call(wrapped=wrapped, counter=counter):
                    old, _ = wrapped(bank, visits, batches[next(counter) % 16], values, 0.5)
                    return old[0, 0]

                call()  # Trace, compile, warm up.
                calls[f"history {dtype} {impl} {mode}"] = call
        times = time_interleaved(calls, args.rounds, args.steps)
        print_ratio_table(
            f"(a) history exchange alone: N={n}, d={d}, B={b}, {dtype} bank "
            "(ratio: custom_op / tf, same mode)",
            times, lambda name: name.replace("custom_op", "tf"))

    x = tf.constant(rng.normal(size=(b, d)).astype(np.float32))
    seed = tf.constant([1, 2])
    calls = {}
    for impl in IMPLS:
        fn = selected[impl].representation_noise
        for mode in MODES:
            wrapped = fn if mode == "eager" else tf.function(fn, jit_compile=mode == "jit")

            def call(wrapped=wrapped):
                return wrapped(x, 0.5, seed)[0, 0]

            call()
            calls[f"noise {impl} {mode}"] = call
    times = time_interleaved(calls, args.rounds, args.steps)
    print_ratio_table(f"(a) representation noise alone: {b} x {d} (ratio: custom_op / tf)",
                      times, lambda name: name.replace("custom_op", "tf"))


def step_times(configs, images, num_samples, rounds, steps):
    functions = {}
    for name, config in configs.items():
        step, iterator = train_function(config, images, num_samples)
        step(iterator)  # Trace, compile, warm up.
        functions[name] = (step, iterator)
    calls = {name: (lambda step=step, it=iterator: step(it)["loss"])
             for name, (step, iterator) in functions.items()}
    return time_interleaved(calls, rounds, steps)


def step_overhead(args, images):
    base = dict(backbone=args.backbone, width=args.width, batch_size=args.step_batch)
    configs = {"none": SimCLICConfig(perturbation="none", **base)}
    for perturbation in ("history", "noise"):
        for impl in IMPLS:
            configs[f"{perturbation} {impl}"] = SimCLICConfig(
                perturbation=perturbation, kernel_impl=impl, **base)
    times = step_times(configs, images, args.rows, args.rounds, args.step_steps)
    print_ratio_table(
        f"(b) training step, {args.backbone} width {args.width}, batch {args.step_batch}, "
        f"history rows {args.rows} float32 (ratio: to none)",
        times, lambda name: "none")


def available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def bank_size_scaling(args, images):
    base = dict(backbone=args.backbone, width=args.width, batch_size=args.step_batch,
                perturbation="history", bank_dtype="bfloat16")
    print(f"\n(c) history step, bfloat16 bank of {args.rows} vs {args.large_rows} rows "
          f"(d={args.dim}; ratio: large / small, same implementation)")
    print(f"{'':<34}{'ms':>10}{'ratio':>10}")
    for impl in IMPLS:
        config = SimCLICConfig(kernel_impl=impl, proj_dim=args.dim, **base)
        small = np.median(step_times({"small": config}, images, args.rows, args.rounds,
                                     args.step_steps)["small"])
        gc.collect()
        print(f"{'history ' + impl + ' ' + str(args.rows):<34}{1000 * small:>10.1f}")
        memory = available_bytes()
        # The bank, plus (TF functions under jit on CPU) its float32 copy and back.
        need = args.large_rows * args.dim * (2 if impl == "custom_op" else 10)
        if memory is not None and need > memory / 2:
            print(f"{'history ' + impl + ' ' + str(args.large_rows):<34}   skipped: would need "
                  f"about {need / 2**30:.1f} GiB, {memory / 2**30:.1f} GiB available")
            continue
        large = np.median(step_times({"large": config}, images, args.large_rows, args.rounds,
                                     args.step_steps)["large"])
        gc.collect()
        print(f"{'history ' + impl + ' ' + str(args.large_rows):<34}{1000 * large:>10.1f}"
              f"{large / small:>10.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--large-rows", type=int, default=IMAGENET_ROWS)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256, help="B of part (a)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="kernel calls per round, (a)")
    parser.add_argument("--step-steps", type=int, default=3, help="train steps per round")
    parser.add_argument("--backbone", default="resnet18_cifar")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--step-batch", type=int, default=128)
    parser.add_argument("--parts", default="abc", help="which of a, b, c to run")
    args = parser.parse_args()

    print(f"TensorFlow {tf.__version__}; kernel implementations: "
          + ", ".join(f"{impl} -> {kernels.select(impl).name}" for impl in ("auto", *IMPLS)))
    images = np.random.default_rng(0).random((args.step_batch, 32, 32, 3), "float32")
    if "a" in args.parts:
        kernels_alone(args)
    if "b" in args.parts:
        step_overhead(args, images)
    if "c" in args.parts:
        bank_size_scaling(args, images)


if __name__ == "__main__":
    main()
