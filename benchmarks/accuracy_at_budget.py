"""kNN and linear accuracy at one fixed budget of optimizer steps on real
CIFAR-10: the encoder at random initialisation, supervised training with
labels (the upper reference), SimSiam (`none`) and the SimCLIC perturbations
at two views and at one, alone and combined. Prints one table and writes it
as markdown and CSV under --out.

    python benchmarks/accuracy_at_budget.py                  # test-set table
    python benchmarks/accuracy_at_budget.py --validation     # recipe tuning
    python benchmarks/accuracy_at_budget.py --equal-wall --rows none,history_1view

With --equal-wall the budget is SimSiam's wall-clock time instead of its
steps: SimSiam runs first for --epochs, and every other row then gets its
pretraining seconds as `--time-budget`, which times the row's own steps and
sizes its epochs to fill them (simclic_tf/budget.py). `--time-budget 20m`
instead gives every row, SimSiam's too, that budget.

Pretraining reads `cifar10_train_10k.npz` (its labels serve only the kNN
memory, the linear classifier and the supervised row), or the CIFAR-10 set
`--dataset` names (the 50,000-image JPEG tree, extracted, for longer
budgets: `--dataset dir:PATH/train`), and evaluation `cifar10_test.npz`,
both from the shared data folder. `--tinyimagenet` pretrains on 30 images
a class of `tinyimagenet200_val.npz` (6,000) instead and queries 10 others
a class (2,000; `write_tinyimagenet_split`). With --validation the
queries are instead 5,000 other CIFAR-10 *training* images (files 1000-1499 of
each class in `cifar10_train_jpeg.tar.gz`, disjoint from the 10k): choose the
recipe and the perturbation settings there, never on the test set. Every row
shares the recipe (RECIPE below, any train.py flag overrides it) and the seed,
so the backbones start from identical weights and take the same number of
steps.
"""

import argparse
import csv
import dataclasses
import math
import os
import tarfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from simclic_tf import SimCLICConfig, sources  # noqa: E402
from simclic_tf.backbones import build_backbone  # noqa: E402
from simclic_tf.cli import add_config_flags, base_config  # noqa: E402
from simclic_tf.evaluation import evaluate_backbone, labelled_memory  # noqa: E402
from simclic_tf.finetune import FineTuneConfig, finetune  # noqa: E402
from simclic_tf.registry import METHODS  # noqa: E402
from simclic_tf.training import build_pretraining  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COLUMNS = ("encoder", "knn_accuracy", "linear_accuracy", "final_z_std", "steps",
           "wall_seconds")
# The recipe of docs/benchmarks.md's equal-steps tables (chosen on the validation
# split): the library's defaults but for base lr 0.06 and the paper's
# projector and predictor sizes, 20 epochs of the 10k file.
RECIPE = dict(epochs=20, base_lr=0.06, proj_dim=2048, pred_hidden=512, knn_every=5)
# key: (row label, the knobs that define the row): `perturbation`, `perturb`,
# and `views` and `strength_ramp` where the config's derived form (one view,
# ramped, for a history target) is not the row's; or a rival `method` and the
# knobs it fixes. A method's recipe knobs (methods.py) apply under the flags
# given, so a screen can vary them.
SSL_ROWS = {
    "none": ("SimSiam (none)", dict(perturbation="none")),
    "history": ("SimCLIC history", dict(perturbation="history", views=2)),
    "dropout": ("SimCLIC dropout", dict(perturbation="dropout")),
    "noise": ("SimCLIC noise", dict(perturbation="noise")),
    "history_1view": ("SimCLIC history, 1 view",
                      dict(perturbation="history", views=1, strength_ramp=0.0)),
    # The perturbation before the predictor instead of on the target: the
    # variants that led SimSiam in the validation screening (docs/benchmarks.md).
    "noise_online": ("SimCLIC noise, online", dict(perturbation="noise", perturb="online")),
    "dropout_online": ("SimCLIC dropout, online", dict(perturbation="dropout", perturb="online")),
    # What no peer has tried: one view with the history on the online branch,
    # history combined with a memoryless perturbation, and a ramped strength.
    "history_1view_online": ("SimCLIC history, 1 view, online",
                             dict(perturbation="history", views=1, perturb="online")),
    "history+dropout": ("SimCLIC history + dropout",
                        dict(perturbation="history+dropout", views=2)),
    "history+noise": ("SimCLIC history + noise", dict(perturbation="history+noise", views=2)),
    "history+dropout_1view": ("SimCLIC history + dropout, 1 view",
                              dict(perturbation="history+dropout", views=1, strength_ramp=0.0)),
    "history+dropout_ramp_1view": ("SimCLIC history + dropout, 1 view, ramped",
                                   dict(perturbation="history+dropout", views=1)),
    "history_ramp": ("SimCLIC history, strength ramped over the first half",
                     dict(perturbation="history", views=2, strength_ramp=0.5)),
    # The shipped default (the ramp, here and above: the derived 0.5, or
    # --strength-ramp's).
    "history_ramp_1view": ("SimCLIC history, 1 view, ramped (the default)",
                           dict(perturbation="history", views=1)),
    # The rival methods on the same encoder, heads and optimiser (simclic_tf/methods.py).
    **{method: (label, dict(method=method, **METHODS.get(method).fixed))
       for method, label in (("byol", "BYOL"), ("simclr", "SimCLR"), ("nnsiam", "NNSiam"))},
}


def write_validation_set(data_dir, path, first=1000, per_class=500):
    """Decodes `per_class` CIFAR-10 training images per class, numbered from
    `first` (the 10k file holds numbers 0-999), into an npz at `path`."""
    with np.load(f"{data_dir}/cifar10_train_10k.npz") as pretraining:
        class_names = list(pretraining["class_names"])
        taken = set(pretraining["source_paths"])
    images, labels, paths = [], [], []
    with tarfile.open(f"{data_dir}/cifar10_train_jpeg.tar.gz") as archive:
        for member in archive:
            if not member.isfile():
                continue
            _, class_name, file_name = member.name.split("/")
            if first <= int(Path(file_name).stem) < first + per_class:
                assert member.name not in taken, member.name
                # PIL, as the shared npz files were decoded (TF's JPEG decoder differs by a level).
                images.append(np.asarray(Image.open(archive.extractfile(member)).convert("RGB")))
                labels.append(class_names.index(class_name))
                paths.append(member.name)
    np.savez(path, x=np.stack(images), y=np.array(labels, np.int64),
             class_names=np.array(class_names), source_paths=np.array(paths))


TINYIMAGENET_SPLIT = {"pretraining": 30, "validation": 10, "test": 10}  # images per class


def write_tinyimagenet_split(data_dir, out):
    """Splits the shared Tiny-ImageNet file (50 images a class) by class, in
    file order, as TINYIMAGENET_SPLIT: images to pretrain on (their labels
    serve the kNN memory and the linear classifier), validation queries and
    held-out test queries. Writes each as an npz under `out` once; returns
    {part: path}."""
    paths = {part: f"{out}/tinyimagenet_{part}.npz" for part in TINYIMAGENET_SPLIT}
    if all(os.path.exists(path) for path in paths.values()):
        return paths
    with np.load(f"{data_dir}/tinyimagenet200_val.npz") as data:
        data = dict(data)
    rank = np.zeros(len(data["y"]), np.int64)  # each image's place within its class
    for label in np.unique(data["y"]):
        members = np.flatnonzero(data["y"] == label)
        rank[members] = np.arange(len(members))
    start = 0
    for part, per_class in TINYIMAGENET_SPLIT.items():
        chosen = (rank >= start) & (rank < start + per_class)
        start += per_class
        np.savez(paths[part], x=data["x"][chosen], y=data["y"][chosen],
                 class_names=data["class_names"], source_paths=data["source_paths"][chosen])
    return paths


def data_files(args):
    """(pretraining npz, evaluation npz) for the data set and split the flags
    ask for; a derived split is written under --out."""
    os.makedirs(args.out, exist_ok=True)
    if args.tinyimagenet:
        split = write_tinyimagenet_split(args.data, args.out)
        return split["pretraining"], split["validation" if args.validation else "test"]
    eval_file = f"{args.data}/cifar10_test.npz"
    if args.validation:
        eval_file = f"{args.out}/cifar10_validation_5k.npz"
        if not os.path.exists(eval_file):
            write_validation_set(args.data, eval_file)
    return f"{args.data}/cifar10_train_10k.npz", eval_file


def row_config(base, key, explicit):
    """The config of row `key`: `base` made the row's method as `--method`
    makes it (its knobs, then the flags given: `explicit`'s names, at their
    values in `base`), then the knobs that define the row."""
    changes = dict(SSL_ROWS[key][1])
    given = {name: getattr(base, name) for name in explicit}
    return base.for_method(changes.pop("method", base.method), **{**given, **changes})


def supervised_row(config, train_set, test_set):
    """The same backbone trained with labels for the same steps (cross-entropy,
    SGD at the recipe's rate, crop and flip), evaluated like the others."""
    keras.utils.set_random_seed(config.seed)
    backbone = build_backbone(config.backbone, train_set.images.shape[1:], config.width,
                              config.bn_momentum, config.zero_init_residual)
    start = time.time()
    recipe = FineTuneConfig(learning_rate=config.learning_rate, backbone_lr_scale=1.0,
                            weight_decay=config.weight_decay, batch_size=config.batch_size)
    model = finetune(backbone, train_set, config.epochs, recipe, seed=config.seed)
    wall = time.time() - start
    results = evaluate_backbone(model.backbone, train_set, test_set, config)
    return {"encoder": "supervised (labels)", **results, "final_z_std": "",
            "wall_seconds": round(wall)}


def ssl_rows(config, train_set, test_set):
    """(random-init row, pretrained row, pretraining seconds) of pretraining
    `config` as `simclic train` does (`build_pretraining`), evaluated on
    `test_set`. The seconds are its `BudgetClock`'s: build, any budget
    timing and the fit, not the evaluations."""
    keras.utils.set_random_seed(config.seed)
    memory, queries = labelled_memory(train_set, test_set, config.seed)
    pretraining = build_pretraining(config, train_set, memory=memory, queries=queries)
    backbone = pretraining.model.backbone
    random_init = evaluate_backbone(backbone, memory, queries, config)
    history = pretraining.fit(verbose=2).history
    seconds = pretraining.clock.seconds
    return ({"encoder": "random init", **random_init, "final_z_std": "", "wall_seconds": 0},
            {**evaluate_backbone(backbone, memory, queries, config),
             "final_z_std": round(history["z_std"][-1], 4), "wall_seconds": round(seconds),
             "steps": pretraining.model.optimizer.iterations.numpy().item()}, seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED_DATA), help="the shared data folder")
    parser.add_argument("--rows", default=",".join(SSL_ROWS),
                        help="comma-separated SSL rows to run (random init always runs)")
    parser.add_argument("--no-supervised", action="store_true", help="skip the supervised row")
    parser.add_argument("--validation", action="store_true",
                        help="evaluate on 5,000 held-out CIFAR-10 training images, "
                        "not the test file")
    parser.add_argument("--tinyimagenet", action="store_true",
                        help="Tiny-ImageNet instead of CIFAR-10: pretrain on 30 images a class "
                        "of the shared file, query 10 others (--image-size 32 to keep "
                        "CIFAR's step)")
    parser.add_argument("--equal-wall", action="store_true",
                        help="give every row SimSiam's wall time instead of its steps")
    parser.add_argument("--out", default="runs/accuracy_at_budget")
    add_config_flags(parser)
    args = parser.parse_args()
    # RECIPE over the defaults, unless a --recipe or --config is given; flags over both.
    start = base_config(args) if args.recipe or args.config else SimCLICConfig(**RECIPE)
    explicit = {field.name: getattr(args, field.name) for field in dataclasses.fields(start)
                if getattr(args, field.name) is not None}
    if (args.validation or args.tinyimagenet) and "dataset" in explicit:
        parser.error("--dataset with --validation or --tinyimagenet: their queries are held out "
                     "of the shared files, so pretrain on those (drop --dataset)")
    train_file, eval_file = data_files(args)
    base = start.replace(**{"dataset": f"npz:{train_file}", **explicit,
                            "eval_dataset": f"npz:{eval_file}"})

    wanted = args.rows.split(",")
    unknown = set(wanted) - set(SSL_ROWS)
    if unknown:
        parser.error(f"--rows: unknown {sorted(unknown)}; choose from {list(SSL_ROWS)}")
    train_set, test_set = sources.load_train_and_eval(base)
    if args.equal_wall:  # SimSiam first: its pretraining time is the others' budget
        wanted = ["none"] + [key for key in wanted if key != "none"]
    rows, simsiam_seconds = [], None
    for key in wanted:
        name = SSL_ROWS[key][0]
        config = row_config(base, key, explicit)
        if args.equal_wall and key != "none":
            config = config.replace(time_budget=f"{simsiam_seconds:.0f}s")
            name += f" (SimSiam's time, {config.time_budget})"
        random_init, pretrained, seconds = ssl_rows(config, train_set, test_set)
        if key == "none":
            simsiam_seconds = seconds
        rows += [random_init] if not rows else []
        rows.append({**pretrained, "encoder": name})
    if not args.no_supervised:
        rows.insert(1, supervised_row(base, train_set, test_set))

    steps = base.epochs * (len(train_set) // base.batch_size)
    lines = [
        f"ResNet-18 (CIFAR stem) width {base.width}, batch {base.batch_size}, {base.epochs} "
        f"epochs = {steps} steps, base lr {base.base_lr} (lr {base.learning_rate:g}), "
        f"warm-up {base.warmup_epochs} epochs, weight decay {base.weight_decay}, predictor lr "
        f"x{base.for_budget(steps // base.epochs)[0].pred_lr_scale}"
        f"{' fixed' if base.fix_pred_lr else ''}; kNN k={base.knn_k} "
        f"t={base.knn_t}; evaluated on {os.path.basename(eval_file)}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(
            f"{row.get(c, math.nan):.4f}" if isinstance(row.get(c), float) else str(row.get(c, ""))
            for c in COLUMNS) + " |")
    print("\n" + "\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(f"{args.out}/table.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(f"{args.out}/table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
