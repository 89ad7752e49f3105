"""A pretraining run on a folder larger than memory would hold decoded,
streamed: its peak RSS and whether each image was visited at most once an
epoch (the history bank's visit counts).

    python benchmarks/streamed_run.py                      # 200,000 images at 96 px
    python benchmarks/streamed_run.py --copies 1 --image-size 32

The folder is the 50,000 CIFAR-10 training JPEGs of ../shared/data, each
linked `--copies` times under its class (200,000 files: 5.1 GiB once decoded
at 96 px, 3 x 96 x 96 bytes an image), in a temporary folder; the test
split evaluates. `simclic train` runs with `--data-storage stream` (or
`--data-storage memory`, to compare), a small
encoder and a capped kNN memory, so that the figure is the data's cost, not
the model's. Peak RSS is the run process's `ru_maxrss`.
"""

import argparse
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def linked_tree(source, target, copies):
    """`target`/<class>/<copy>_<name>: each image of `source` linked `copies` times."""
    count = 0
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir()):
            for copy in range(copies):
                os.symlink(image, target / class_dir.name / f"{copy}_{image.name}")
                count += 1
    return count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--data-storage", default="stream",
                        help="memory: the same run on the decoded set, to compare")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for split in ("train", "test"):
            with tarfile.open(SHARED / f"cifar10_{split}_jpeg.tar.gz") as tar:
                tar.extractall(scratch / "jpeg", filter="data")
        count = linked_tree(scratch / "jpeg" / "train", scratch / "large", args.copies)
        decoded = count * 3 * args.image_size ** 2
        print(f"{count} image files, {decoded / 2**30:.1f} GiB decoded at {args.image_size} px")
        run_dir = scratch / "run"
        command = [
            sys.executable, "train.py", "--dataset", f"dir:{scratch / 'large'}",
            "--eval-dataset", f"dir:{scratch / 'jpeg' / 'test'}",
            "--image-size", str(args.image_size), "--data-storage", args.data_storage,
            "--backbone", "tiny_convnet", "--width", "8", "--proj-dim", "128",
            "--pred-hidden", "32", "--batch-size", str(args.batch_size),
            "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch),
            "--knn-bank-size", "5000", "--knn-every", "0", "--linear-epochs", "20",
            "--kernel-impl", "tf", "--run-dir", str(run_dir)]
        print("$", " ".join(command[1:]), flush=True)
        start = time.time()
        subprocess.run(command, cwd=ROOT, check=True)
        seconds = time.time() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        print(f"\nrun: {seconds:.0f} s; peak RSS {peak:.2f} GiB against {decoded / 2**30:.1f} "
              f"GiB decoded ({100 * peak * 2**30 / decoded:.0f} %)")
        visits = bank_visits(run_dir / "model.keras")
        steps = args.epochs * args.steps_per_epoch
        print(f"history visits: {int(visits.sum())} writes over {steps} steps of "
              f"{args.batch_size} (expected {steps * args.batch_size}); most visits of one "
              f"index: {int(visits.max())}; indices visited: {int((visits > 0).sum())} "
              f"of {len(visits)}")
        # Within one pass (N // B steps) an index comes at most once.
        passes = -(-steps // (count // args.batch_size))
        print("each index at most once a pass:", bool(visits.max() <= passes))


def bank_visits(model_path):
    """The history bank's visit counts saved in a SimCLIC .keras file."""
    sys.path.insert(0, str(ROOT))
    import simclic_tf  # noqa: F401  (first: registers SimCLIC, quiets TensorFlow's start)
    import keras

    model = keras.models.load_model(model_path, safe_mode=True)
    return np.asarray(keras.ops.convert_to_numpy(model.perturbation.visits))


if __name__ == "__main__":
    main()
