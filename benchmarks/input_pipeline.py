"""The pretraining input pipeline alone, streamed from image files against
decoded in memory, and the training step it must keep fed.

    python benchmarks/input_pipeline.py                  # 32 and 96 px, both storages
    python benchmarks/input_pipeline.py --sizes 32 --batches 40

The 50,000 CIFAR-10 training JPEGs of ../shared/data/cifar10_train_jpeg.tar.gz
are extracted to a temporary folder. Each (size, storage) runs in its own
process, so that its peak RSS (`ru_maxrss`) is its own: `load_images` (dir:,
`--data-storage stream` or `memory`, resized to the size), then
`pretrain_dataset` with SimSiam's augmentation and two views, as `simclic
train` builds it; `--warmup` batches untimed, then `--batches` batches timed.
images/s counts images (two views each) per second. Then the training step
of the CIFAR ResNet-18 (`--width`, the history perturbation, batch
`--batch-size`) on one fixed batch at each size, timed alone over
`--steps` steps: `pipeline / step` is how many times faster the input is
than the step it feeds (below 1: the input bounds training). Both use every
core; in a run they share them.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10_train_jpeg.tar.gz"


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_pipeline(folder, size, storage, args):
    """{load_s, images_per_s, peak_rss_mib, storage} of one pipeline."""
    from simclic_tf import augment, pipelines, sources

    start = time.time()
    images = sources.load_images(f"dir:{folder}", image_size=size, storage=storage)
    loaded = time.time() - start
    augmentation = augment.build_augmentation((size, size), 3, seed=0)
    batches = iter(pipelines.pretrain_dataset(
        images, args.batch_size, 2, augmentation, seed=0, epochs=1,
        steps_per_epoch=args.warmup + args.batches))
    for _ in range(args.warmup):
        next(batches)
    start = time.time()
    for _ in range(args.batches):
        next(batches)
    seconds = time.time() - start
    return {"storage": images.storage, "load_s": loaded,
            "images_per_s": args.batches * args.batch_size / seconds,
            "peak_rss_mib": peak_rss_mib()}


def measure_step(size, args):
    """{images_per_s, ms_per_step} of the training step alone on one batch."""
    import numpy as np
    import tensorflow as tf

    from simclic_tf.config import SimCLICConfig
    from simclic_tf.model import SimCLIC, build_optimizer

    config = SimCLICConfig(width=args.width, batch_size=args.batch_size, kernel_impl="tf")
    model = SimCLIC(config, (size, size, 3), 50_000)
    model.compile(optimizer=build_optimizer(config, 390))
    rng = np.random.default_rng(0)
    views = tuple(tf.constant(rng.random((args.batch_size, size, size, 3), np.float32))
                  for _ in range(2))
    batch = (views, tf.constant(rng.permutation(50_000)[:args.batch_size], tf.int32))
    model.make_train_function()
    step = model.train_function
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
    for _ in range(2):
        float(step(iterator)["loss"])
    start = time.time()
    for _ in range(args.steps):
        logs = step(iterator)
    float(logs["loss"])
    seconds = (time.time() - start) / args.steps
    return {"images_per_s": args.batch_size / seconds, "ms_per_step": 1000 * seconds}


def child(argv):
    """One measurement in this process, printed as a JSON line."""
    kind, *rest = argv
    args = parse_args(rest[2:] if kind == "pipeline" else rest[1:])
    if kind == "pipeline":
        result = measure_pipeline(rest[0], int(rest[1]), args.storage_value, args)
    else:
        result = measure_step(int(rest[0]), args)
    print(json.dumps(result))


def run_child(*argv):
    done = subprocess.run([sys.executable, __file__, "--child", *map(str, argv)],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32,96", help="image sides, comma-separated")
    parser.add_argument("--storages", default="stream,memory")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=200, help="timed batches")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches first")
    parser.add_argument("--width", type=int, default=32, help="ResNet-18 width of the step")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--storage-value", default="stream", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not ARCHIVE.exists():
        sys.exit(f"{ARCHIVE} not found: the shared data folder must sit beside the repo")
    sizes = [int(side) for side in args.sizes.split(",")]
    forwarded = [f"--batch-size={args.batch_size}", f"--batches={args.batches}",
                 f"--warmup={args.warmup}", f"--width={args.width}", f"--steps={args.steps}"]
    print(f"{os.cpu_count()} CPU cores; batch {args.batch_size}; two views an image")
    with tempfile.TemporaryDirectory() as scratch:
        start = time.time()
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(scratch, filter="data")
        folder = Path(scratch) / "train"
        print(f"extracted {sum(1 for _ in folder.rglob('*.jpg'))} JPEGs in "
              f"{time.time() - start:.0f} s")
        print("| size | storage | load s | pipeline images/s | peak RSS MiB | step images/s "
              "| pipeline / step |")
        print("|---|---|---|---|---|---|---|")
        for size in sizes:
            step = run_child("step", size, *forwarded)
            for storage in args.storages.split(","):
                result = run_child("pipeline", folder, size, *forwarded,
                                   f"--storage-value={storage}")
                print(f"| {size} | {result['storage']} | {result['load_s']:.0f} | "
                      f"{result['images_per_s']:.0f} | {result['peak_rss_mib']:.0f} | "
                      f"{step['images_per_s']:.1f} | "
                      f"{result['images_per_s'] / step['images_per_s']:.1f}x |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.path.insert(0, str(ROOT))
        child(sys.argv[2:])
    else:
        main()
