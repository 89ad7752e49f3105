"""The results of an ablation search as the paper prints them: one column per
variant (Tables 4 to 6: "Effect of predictor h", ...) with the error rate
(100 - accuracy %) on the validation split, the final collapse signals and
whether they show a collapse (`callbacks.CollapseMonitor`); for a
continuous search (strength) one row per trial. Written as `results.md` and
`results.csv`, and every trial in long form as `trials.csv`.

Records are plain dicts, so the tables can be rebuilt from a run directory
without the tuner: `{"trial_id", "status", "values": {knob: value},
"metrics": {name: value}}`.
"""

import csv
import math
import os

from simclic_tf import compat
from simclic_tf.report import error_percent
from simclic_tf.tuning.hypermodel import objective_name

# Display labels of the paper's columns, in the paper's order. The variants
# themselves come from the search space; a variant not listed here (a newly
# registered predictor, say) gets a column headed by its name, after these.
LABELS = {
    "predictor": ("Effect of predictor h", {
        "none": "No predictor", "fixed_random": "Fixed random init",
        "mlp1": "1-layer MLP", "mlp2": "2-layer MLP"}),
    "stop_gradient": ("Effect of stop-gradient", {
        True: "w/ stop-gradient", False: "w/o stop-gradient"}),
    "loss": ("Effect of the loss D", {"cosine": "Cosine", "cross_entropy": "Cross-entropy",
                                      "nt_xent": "NT-Xent"}),
    "perturbation": ("Effect of the perturbation P", {
        "none": "None (SimSiam)", "history": "History", "dropout": "Dropout", "noise": "Noise",
        "history+noise": "History + noise", "history+dropout": "History + dropout",
        "nearest_neighbour": "Nearest neighbour (NNSiam)"}),
    "perturb": ("Where P applies", {
        "target": "Target branch", "online": "Online branch (before h)"}),
}
KINDS = (("knn", "kNN error %"), ("linear", "linear error %"))
SIGNALS = ("z_std", "z_rank")


def optional_error(record, kind):
    """The record's error % for `kind` (knn or linear), None when not measured."""
    accuracy = record["metrics"].get(objective_name(kind))
    return None if accuracy is None else error_percent(accuracy)


def collapsed(record, monitor):
    """"yes" when the `callbacks.CollapseMonitor` finds the record's final
    metrics collapsed, else "no"; None when they hold no collapse signal."""
    verdict = monitor.is_collapsed(record["metrics"])
    return None if verdict is None else ("yes" if verdict else "no")


def trial_records(oracle):
    """Records of every trial the oracle has started, in start order."""
    records = []
    for trial in compat.started_trials(oracle):
        metrics = {name: trial.metrics.get_last_value(name)
                   for name in trial.metrics.metrics}
        records.append({"trial_id": trial.trial_id, "status": str(trial.status),
                        "values": dict(trial.hyperparameters.values), "metrics": metrics})
    return records


def completed(records):
    return [r for r in records if r["status"] == "COMPLETED"]


def best_record(records, objective="knn"):
    """The completed record with the highest objective, or None."""
    name = objective_name(objective)
    scored = [r for r in completed(records)
              if r["metrics"].get(name) is not None and not math.isnan(r["metrics"][name])]
    return max(scored, key=lambda r: r["metrics"][name], default=None)


def _kinds(records):
    return [(kind, title) for kind, title in KINDS
            if any(objective_name(kind) in r["metrics"] for r in records)]


def discrete_table(ablation, variants, records, objective, collapse, extra=()):
    """(title, header, rows) of a table with one column per variant (in the
    paper's order), the best completed trial of each; cells are numbers,
    strings, or None for a variant not run yet."""
    title, labels = LABELS.get(ablation, (f"Effect of {ablation}", {}))
    ordered = [v for v in labels if v in variants] + [v for v in variants if v not in labels]
    chosen = [best_record([r for r in records if r["values"].get(ablation) == v], objective)
              for v in ordered]
    header = [ablation] + [labels.get(v, str(v)) for v in ordered]
    rows = []
    for kind, row_title in _kinds(records) or [(objective, KINDS[0][1])]:
        rows.append([row_title] + [None if r is None else optional_error(r, kind)
                                   for r in chosen])
    for signal in SIGNALS:
        rows.append([f"final {signal}"] + [None if r is None else r["metrics"].get(signal)
                                           for r in chosen])
    rows.append(["collapsed"] + [None if r is None else collapsed(r, collapse)
                                 for r in chosen])
    for name in extra:
        rows.append([name] + [None if r is None else r["values"].get(name) for r in chosen])
    rows.append(["trial"] + [None if r is None else r["trial_id"] for r in chosen])
    return title, header, rows


def continuous_table(title, fields, records, collapse):
    """(title, header, rows): one row per completed trial, sorted by the tuned values."""
    kinds = _kinds(records)
    header = (list(fields) + [t for _, t in kinds] + [f"final {signal}" for signal in SIGNALS]
              + ["collapsed", "trial"])
    rows = []
    for r in sorted(completed(records), key=lambda r: [r["values"].get(f) for f in fields]):
        rows.append(
            [r["values"].get(f) for f in fields]
            + [optional_error(r, kind) for kind, _ in kinds]
            + [r["metrics"].get(signal) for signal in SIGNALS]
            + [collapsed(r, collapse), r["trial_id"]])
    return title, header, rows


def _text(value, title=""):
    if value is None:
        return "-"
    if isinstance(value, float):
        if "error" in title:
            return f"{value:.2f}"
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def markdown(title, header, rows, notes=(), by_column=True):
    """A markdown table; with `by_column` the rows are metrics (the first cell
    names them) and each cell is formatted by its row, else by its column."""
    lines = [f"## {title}", ""] + [f"{note}" for note in notes] + (["", ] if notes else [])
    lines += ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if by_column:
            cells = [row[0]] + [_text(cell, row[0]) for cell in row[1:]]
        else:
            cells = [_text(cell, name) for cell, name in zip(row, header)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def _csv_cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(float(value))  # round-trips (and no np.float64(...))
    return str(value)


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[_csv_cell(c) for c in row] for row in rows])


def write_trials_csv(path, fields, records):
    """Every trial, one row each: id, status, tuned values, metrics."""
    metrics = sorted({name for r in records for name in r["metrics"]})
    header = ["trial", "status"] + list(fields) + metrics
    rows = [[r["trial_id"], r["status"]] + [r["values"].get(f) for f in fields]
            + [r["metrics"].get(m) for m in metrics] for r in records]
    write_csv(path, header, rows)


def write_results(run_dir, title, header, rows, notes=(), by_column=True):
    """results.md and results.csv in `run_dir`; returns the markdown."""
    text = markdown(title, header, rows, notes, by_column)
    with open(os.path.join(run_dir, "results.md"), "w") as f:
        f.write(text)
    write_csv(os.path.join(run_dir, "results.csv"), header, rows)
    return text
