"""What a new user's first runs reach: `python train.py` with no flags, for
seeds 0, 1 and 2, and the CIFAR-10 defaults with nothing but data, width and
epochs (10 epochs of the shared 10k file: 780 steps at width 16). Prints each
run's kNN and linear accuracy against its own random initialisation, the
gain in points and the wall time of the whole command.

    python benchmarks/default_job.py                 # all four runs
    python benchmarks/default_job.py --seeds 0 --no-cifar

Each run is `train.py` in a subprocess, as a user types it. The first one
builds the C++ op into an empty cache (--cold-build, default on), so its wall
time includes the build a fresh machine pays once.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def timed_train(run_dir, flags, env):
    """(report.json of `python train.py flags --run-dir run_dir`, wall seconds)."""
    start = time.time()
    subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, "--run-dir", str(run_dir)],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.time() - start
    return json.loads((Path(run_dir) / "report.json").read_text()), wall


def row(name, report, wall):
    cells = [name]
    for key in ("knn_accuracy", "linear_accuracy"):
        before, after = 100 * report["random_init"][key], 100 * report["pretrained"][key]
        cells += [f"{before:.1f}", f"{after:.1f}", f"{after - before:+.1f}"]
    return "| " + " | ".join(cells + [str(report["steps"]), f"{wall:.0f}"]) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--no-cifar", action="store_true", help="skip the CIFAR-10 run")
    parser.add_argument("--no-cold-build", action="store_true",
                        help="use the cached C++ op in the first run too")
    parser.add_argument("--data", default=str(SHARED_DATA), help="the shared data folder")
    parser.add_argument("--out", default="runs/default_job")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cold_cache = tempfile.mkdtemp(prefix="simclic-cold-cache-")
    runs = []
    for seed in args.seeds:
        cold = not args.no_cold_build and not runs
        name = f"`python train.py --seed {seed}`" + (" (C++ op built)" if cold else "")
        runs.append((name, f"{args.out}/shapes_seed{seed}", ["--seed", str(seed)],
                     {**env, "XDG_CACHE_HOME": cold_cache} if cold else env))
    if not args.no_cifar:
        flags = ["--dataset", f"npz:{args.data}/cifar10_train_10k.npz",
                 "--eval-dataset", f"npz:{args.data}/cifar10_test.npz",
                 "--width", "16", "--epochs", "10"]
        runs.append(("CIFAR-10 10k, `--width 16 --epochs 10`", f"{args.out}/cifar10", flags, env))
    lines = ["| run | kNN random % | kNN pretrained % | kNN gain | linear random % | "
             "linear pretrained % | linear gain | steps | wall s |", "|---" * 9 + "|"]
    for name, run_dir, flags, run_env in runs:
        shutil.rmtree(run_dir, ignore_errors=True)
        lines.append(row(name, *timed_train(run_dir, flags, run_env)))
        print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
