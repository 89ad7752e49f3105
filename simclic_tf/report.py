"""report.json (everything, machine-readable) and report.md (error rates, as
the paper reports them, and the settings that produced them)."""

import json
import os

METRICS = (("knn_accuracy", "kNN (k={knn_k}, t={knn_t}) error %"),
           ("linear_accuracy", "linear error %"),
           ("finetune_accuracy", "fine-tuned error %"))


def error_percent(accuracy):
    return 100.0 * (1.0 - accuracy)


def markdown(report):
    config = report["config"]
    columns = [(key, title.format(**config)) for key, title in METRICS
               if key in report["pretrained"]]
    lines = [
        f"# SimCLIC run: {config['dataset']}",
        "",
        "| encoder | " + " | ".join(title for _, title in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for label, key in (("pretrained", "pretrained"), ("random initialisation", "random_init")):
        cells = [f"{error_percent(report[key][metric]):.2f}" for metric, _ in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    collapsed = report["collapsed_at_epoch"]
    if "online_probe_accuracy" in report:
        lines += ["", "Online linear probe (trained during pretraining on augmented views, "
                  "apart from the offline linear evaluation above): test error "
                  f"{error_percent(report['online_probe_accuracy']):.2f} %"]
    lines += [
        "",
        f"- final loss {report['final_loss']:.4f}, final z_std {report['final_z_std']:.4f} "
        f"(healthy is about 1/sqrt({config['proj_dim']}) = {config['proj_dim'] ** -0.5:.4f})",
        f"- collapse: {'at epoch ' + str(collapsed) if collapsed else 'none detected'}",
        f"- data: {report['data']['train_images']} training and {report['data']['test_images']}"
        f" test images of shape {report['data']['image_shape']}",
        f"- pretraining wall time {report['train_seconds']:.0f} s",
    ]
    if report.get("pictures"):
        lines += ["", "## Pictures", ""] + [
            f"![{title}]({name})" for title, name in report["pictures"].items()]
    lines += [
        "",
        "## Settings",
        "",
        "| knob | value |",
        "|---|---|",
    ] + [f"| {name} | {value} |" for name, value in sorted(config.items())]
    return "\n".join(lines) + "\n"


def write_report(report, run_dir):
    with open(os.path.join(run_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write(markdown(report))
