"""kNN and linear accuracy of SimSiam and each SimCLIC perturbation at one
fixed budget on real CIFAR-10, against the same encoder at random
initialisation; prints a table and writes it as CSV.

    python benchmarks/accuracy_at_budget.py --epochs 25 --width 16 --base-lr 0.06

Pretraining reads `cifar10_train_10k.npz` (labels unused; they serve as the
kNN memory and the linear classifier's training set) and evaluation
`cifar10_test.npz`, both from the shared data folder. Every row uses the same
config but for the perturbation, and the same seed, so the backbones start
from identical weights.
"""

import argparse
import csv
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from simclic_tf import SimCLICConfig  # noqa: E402
from simclic_tf.run import run  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COLUMNS = ("encoder", "knn_accuracy", "linear_accuracy", "final_z_std", "wall_seconds")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED_DATA), help="the shared data folder")
    parser.add_argument("--perturbations", default="none,history,dropout,noise")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--base-lr", type=float, default=0.06)
    parser.add_argument("--warmup-epochs", type=int, default=0)
    parser.add_argument("--out", default="runs/accuracy_at_budget")
    args = parser.parse_args()

    base = SimCLICConfig(
        dataset=f"npz:{args.data}/cifar10_train_10k.npz",
        eval_dataset=f"npz:{args.data}/cifar10_test.npz",
        width=args.width, epochs=args.epochs, batch_size=args.batch_size,
        base_lr=args.base_lr, warmup_epochs=args.warmup_epochs, knn_every=5)
    rows = []
    for name in args.perturbations.split(","):
        report = run(base.replace(perturbation=name, run_dir=f"{args.out}/{name}"))
        if not rows:
            rows.append({"encoder": "random init", **report["random_init"],
                         "final_z_std": "", "wall_seconds": ""})
        rows.append({"encoder": f"{'SimSiam' if name == 'none' else 'SimCLIC'} ({name})",
                     **report["pretrained"], "final_z_std": round(report["final_z_std"], 4),
                     "wall_seconds": round(report["train_seconds"])})
    steps = args.epochs * (10000 // args.batch_size)
    print(f"\nResNet-18 (CIFAR stem) width {args.width}, batch {args.batch_size}, "
          f"{args.epochs} epochs = {steps} steps, base lr {args.base_lr}, "
          f"warm-up {args.warmup_epochs} epochs; kNN k=200 t=0.1 on 10k train / 10k test")
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(
            f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS) + " |")
    with open(f"{args.out}/table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
