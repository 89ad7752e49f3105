"""Does bfloat16 cost accuracy? kNN and linear accuracy of the library's
defaults on the shared CIFAR-10 10k file (evaluated on the test file) in
float32 and in mixed_bfloat16, at equal steps, for each --steps budget and
seed: the check behind `--precision auto` choosing bfloat16 on CPUs that
compute it natively. Prints one row per run and the bfloat16 - float32 kNN
difference per (steps, seed).

    python benchmarks/precision_accuracy.py                        # 780, 1560 steps x seeds 0, 1
    python benchmarks/precision_accuracy.py --epochs 10 --seeds 0

Each run is `train.py` in a subprocess as a user types it, with nothing but
the data, the epochs (78 steps each), the precision and the seed.
"""

import argparse
import os
import shutil

from default_job import SHARED_DATA, timed_train

PRECISIONS = ("float32", "mixed_bfloat16")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs="*", default=[10, 20],
                        help="pretraining epochs of 78 steps (10: 780 steps, 20: 1,560)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--data", default=str(SHARED_DATA), help="the shared data folder")
    parser.add_argument("--out", default="runs/precision_accuracy")
    args = parser.parse_args()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    data = ["--dataset", f"npz:{args.data}/cifar10_train_10k.npz",
            "--eval-dataset", f"npz:{args.data}/cifar10_test.npz"]
    lines = ["| steps | seed | precision | kNN % | linear % | train s |", "|---" * 6 + "|"]
    knn = {}
    for epochs in args.epochs:
        for seed in args.seeds:
            for precision in PRECISIONS:
                run_dir = f"{args.out}/{precision}_e{epochs}_s{seed}"
                shutil.rmtree(run_dir, ignore_errors=True)
                report, _ = timed_train(run_dir, [*data, "--epochs", str(epochs), "--seed",
                                                  str(seed), "--precision", precision], env)
                knn[epochs, seed, precision] = 100 * report["pretrained"]["knn_accuracy"]
                lines.append(f"| {report['steps']} | {seed} | {precision} | "
                             f"{knn[epochs, seed, precision]:.2f} | "
                             f"{100 * report['pretrained']['linear_accuracy']:.2f} | "
                             f"{report['train_seconds']:.0f} |")
                print(lines[-1], flush=True)
    print("\n" + "\n".join(lines) + "\n")
    for (epochs, seed, precision), value in knn.items():
        if precision == "mixed_bfloat16":
            print(f"{epochs} epochs, seed {seed}: bfloat16 - float32 kNN = "
                  f"{value - knn[epochs, seed, 'float32']:+.2f} points")


if __name__ == "__main__":
    main()
