"""report.json (everything, machine-readable) and report.md (error rates, as
the paper reports them, and the settings that produced them), and the same
figures and settings in the form of TensorBoard's HParams dashboard."""

import json
import os

from simclic_tf.callbacks import COLLAPSED_RANK
from simclic_tf.config import SimCLICConfig
from simclic_tf.faults import atomic_path, divergence_advice

METRICS = (("knn_accuracy", "kNN (k={knn_k}, t={knn_t}) error %"),
           ("linear_accuracy", "linear error %"),
           ("finetune_accuracy", "fine-tuned error %"))


def error_percent(accuracy):
    return 100.0 * (1.0 - accuracy)


def verdict(report):
    """One sentence: whether pretraining beat the same encoder at random
    initialisation (kNN accuracy up and linear accuracy not down), by how
    much, against chance, and what to try when it did not; or that it diverged."""
    if "diverged" in report:
        diverged = report["diverged"]
        advice = divergence_advice(SimCLICConfig.from_dict(report["config"]))
        return (f"Pretraining diverged at epoch {diverged['epoch']}, step {diverged['step']} "
                f"({diverged['what']} is not finite): nothing was exported. Try {advice}, "
                "in a new --run-dir.")
    pretrained, random_init = report["pretrained"], report["random_init"]
    moves = []
    for key, name in (("knn_accuracy", "kNN"), ("linear_accuracy", "linear")):
        if key in pretrained:
            before, after = 100 * random_init[key], 100 * pretrained[key]
            moves.append((name, before, after, after - before))
    improved = moves[0][3] > 0 and all(gain >= 0 for *_, gain in moves)
    change = " and ".join(f"{name} accuracy from {before:.1f} % to {after:.1f} % "
                          f"({gain:+.1f} points)" for name, before, after, gain in moves)
    # An unlabelled training set is evaluated on its labelled evaluation set.
    classes = report["data"].get("knn_classes") or report["data"]["num_classes"]
    chance = f"chance is {100 / classes:.1f} % ({classes} classes)"
    if improved:
        return (f"Pretraining improved the encoder: it moved {change}; {chance}. "
                "The tables give error rates: lower is better.")
    return (f"Pretraining did not improve the encoder: it moved {change}; {chance}. "
            "Try more --epochs or a shipped preset (--recipe cpu on a CPU, --recipe cifar "
            "on a GPU). The tables give error rates: lower is better.")


def error_table(report):
    """The markdown table of error rates, pretrained against random initialisation."""
    config = report["config"]
    columns = [(key, title.format(**config)) for key, title in METRICS
               if key in report["random_init"]]
    lines = ["| encoder | " + " | ".join(title for _, title in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for label, key in (("pretrained", "pretrained"), ("random initialisation", "random_init")):
        if key not in report:
            continue
        cells = [f"{error_percent(report[key][metric]):.2f}" for metric, _ in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def data_line(data, knn_bank_size):
    """report.md's line on the data: sizes, where the pixels were read from,
    and the kNN memory (`labelled_memory` caps it at exactly knn_bank_size)."""
    line = (f"- data: {data['train_images']} training and {data['test_images']} test images "
            f"of shape {data['image_shape']}, read ")
    storage = data.get("storage", "memory")
    line += "from memory" if storage == "memory" else f"from disk ({storage})"
    if "knn_memory_images" in data:
        line += f"; kNN memory {data['knn_memory_images']} images"
        if knn_bank_size is not None and data["knn_memory_images"] == knn_bank_size:
            line += f" (capped by --knn-bank-size {knn_bank_size})"
    return line


def markdown(report):
    config = report["config"]
    lines = [f"# SimCLIC run: {config['dataset']}", "", verdict(report), ""]
    lines += error_table(report)
    if "diverged" in report:
        return "\n".join(lines + ["", *settings(config)]) + "\n"
    collapsed = report["collapsed_at_epoch"]
    if "online_probe_accuracy" in report:
        lines += ["", "Online linear probe (trained during pretraining on augmented views, "
                  "apart from the offline linear evaluation above): test error "
                  f"{error_percent(report['online_probe_accuracy']):.2f} %"]
    lines += [
        "",
        f"- final loss {report['final_loss']:.4f}, final z_std {report['final_z_std']:.4f} "
        f"(healthy is about 1/sqrt({config['proj_dim']}) = {config['proj_dim'] ** -0.5:.4f}), "
        f"final z_rank {report['final_z_rank']:.3f} (the batch of z's effective rank as a "
        f"fraction of its most; a collapse below {COLLAPSED_RANK})",
        f"- collapse: {'at epoch ' + str(collapsed) if collapsed else 'none detected'}"
        + (", where --stop-on-collapse ended pretraining"
           if collapsed and config["stop_on_collapse"] else ""),
        data_line(report["data"], config.get("knn_bank_size")),
        f"- pretraining wall time {report['train_seconds']:.0f} s",
    ]
    if report.get("budget"):
        lines.append(budget_line(report["budget"], report["steps"]))
    if report.get("precision_pick"):
        lines.append(f"- precision {report['precision_pick']} (--precision auto)")
    if report.get("derived"):
        lines.append(f"- derived from the run's length ({report['steps']} steps; give the "
                     "flag to override): " + ", ".join(
                         f"--{name.replace('_', '-')} {value}"
                         for name, value in sorted(report["derived"].items())))
    if report.get("pictures"):
        lines += ["", "## Pictures", ""] + [
            f"![{title}]({name})" for title, name in report["pictures"].items()]
    lines += ["", *settings(config)]
    return "\n".join(lines) + "\n"


def budget_line(budget, steps):
    """What --time-budget chose and spent."""
    chosen = (f"at most {budget['epochs']} epochs x {budget['steps_per_epoch']} steps planned "
              f"from a step of {budget['step_seconds']:.3f} s timed over "
              f"{budget['timed_steps']} steps; " if "epochs" in budget else "")
    ending = (f"the budget ran out at step {budget['ran_out_at_step']}, before the schedules' end"
              if budget["ran_out_at_step"] is not None else
              f"{steps} steps, the length fitted to the run's pace, ended the schedules")
    return (f"- time budget {budget['budget_seconds']:.0f} s: {chosen}pretraining took "
            f"{budget['seconds']:.0f} s (timing and start-up included); {ending}")


def settings(config):
    """The markdown table of every knob of the run."""
    return ["## Settings", "", "| knob | value |", "|---|---|"] + [
        f"| {name} | {value} |" for name, value in sorted(config.items())]


def hparam_values(config):
    """The knobs of a run's `config` (report.json's) as HParams: every knob but
    run_dir (the session's own name in the dashboard), a knob left at None (its
    default: the dataset's own, Keras's auto) as the string "none", so that
    every knob has a column."""
    return {name: "none" if value is None else value
            for name, value in config.items() if name != "run_dir"}


def tensorboard_metrics(report):
    """{tag: error} of the report for TensorBoard: final/METRIC_error for the
    pretrained encoder (and its online probe), random_init/METRIC_error for
    the random initialisation; each 1 - report.json's accuracy, a fraction
    (report.md's error % over 100). A diverged run has random_init/ only."""
    metrics = {}
    for encoder, prefix in (("pretrained", "final"), ("random_init", "random_init")):
        for key, accuracy in report.get(encoder, {}).items():
            metrics[f"{prefix}/{key.replace('_accuracy', '_error')}"] = 1.0 - accuracy
    if "online_probe_accuracy" in report:
        metrics["final/online_probe_error"] = 1.0 - report["online_probe_accuracy"]
    return metrics


def write_report(report, run_dir):
    """report.json and report.md, each written whole or not at all."""
    with atomic_path(os.path.join(run_dir, "report.json")) as partial, open(partial, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    with atomic_path(os.path.join(run_dir, "report.md")) as partial, open(partial, "w") as f:
        f.write(markdown(report))


def data_summary(train_set, test_set):
    """What a run's history buffer and evaluation depend on in its data."""
    return {"train_images": len(train_set), "test_images": len(test_set),
            "image_shape": list(train_set.image_shape),
            "num_classes": train_set.num_classes}


def describe_data(train_set, test_set, memory):
    """One line: the sets, where their pixels are read from, the kNN memory."""
    def described(images):
        return (f"{len(images)} images {'x'.join(map(str, images.image_shape))} "
                f"({STORAGE_NAMES[images.storage]}, {byte_size(images.nbytes)} decoded)")

    return (f"Data: training {described(train_set)}; evaluation {described(test_set)}; "
            f"kNN memory {len(memory)} images")


def byte_size(count):
    """`count` bytes as a person reads them: 90 KiB, 5.2 GiB."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if count >= size:
            value = count / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{count} B"


STORAGE_NAMES = {"memory": "in memory", "files": "streamed from image files",
                 "memmap": "streamed from a memory-mapped .npz",
                 "stream": "streamed from tensorflow-datasets' files"}
