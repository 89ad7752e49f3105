"""The keras-tuner ablations: a search space derived from the config, grid
and Bayesian searches that resume, the results tables, TensorBoard HParams,
and collapse without stop-gradient. Tiny budgets: tiny_convnet on digits."""

import csv
import dataclasses
import glob
import json
import os

import keras_tuner
import pytest

from simclic_tf.commands import command, train
from simclic_tf import SimCLICConfig, sources
from simclic_tf.callbacks import COLLAPSED_RANK, CollapseMonitor
from simclic_tf.registry import LOSSES, PERTURBATIONS, PREDICTORS
from simclic_tf.tuning import hypermodel as hypermodel_module
from simclic_tf.tuning import table

tune = command("tune")
TINY = ["--dataset", "digits", "--backbone", "tiny_convnet", "--width", "4", "--proj-dim", "32",
        "--pred-hidden", "8", "--batch-size", "64", "--knn-k", "20", "--knn-every", "0",
        "--quiet"]
FIELDS = {f.name: f for f in dataclasses.fields(SimCLICConfig)}


def space(ablation, **changes):
    config = SimCLICConfig(**changes)
    return hypermodel_module.search_space(
        config, hypermodel_module.ablation_fields(ablation, config))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def trial_json(run_dir, trial_id):
    return json.loads((run_dir / "tuner" / f"trial_{trial_id}" / "trial.json").read_text())


def hparams_events(log_dir):
    """{tag: HParamsPluginData} of the hparams summaries in a log directory."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2
    found = {}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents*")):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    found[value.tag] = plugin_data_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content)
    return found


class FitCounter:
    """Counts the trials a search trains (HyperModel.fit calls)."""

    def __init__(self, monkeypatch):
        self.values = []
        original = hypermodel_module.SimCLICHyperModel.fit

        def fit(model_self, hp, model, **kwargs):
            self.values.append(dict(hp.values))
            return original(model_self, hp, model, **kwargs)

        monkeypatch.setattr(hypermodel_module.SimCLICHyperModel, "fit", fit)


def test_the_search_space_comes_from_the_config():
    predictor = space("predictor").space
    assert [p.name for p in predictor] == ["predictor"]
    assert sorted(predictor[0].values) == PREDICTORS.names()
    assert predictor[0].default == FIELDS["predictor"].default
    assert sorted(space("loss").space[0].values) == LOSSES.names()
    assert sorted(space("perturbation").space[0].values) == PERTURBATIONS.names()
    stop_gradient = space("stop_gradient").space[0]
    assert isinstance(stop_gradient, keras_tuner.engine.hyperparameters.Boolean)
    assert stop_gradient.default is True
    perturb = space("perturb", perturbation="noise").space
    assert [p.name for p in perturb] == ["perturb"]
    assert list(perturb[0].values) == list(FIELDS["perturb"].metadata["choices"])
    assert perturb[0].default == "target"
    with pytest.raises(ValueError, match="--perturbation none both branches .* history"):
        space("perturb", perturbation="none")

    for name in PERTURBATIONS.names():
        perturbation = PERTURBATIONS.get(name)
        if perturbation.strength_range is None:
            with pytest.raises(ValueError, match=f"--perturbation {name} has no strength"):
                space("strength", perturbation=name)
            continue
        hp = space("strength", perturbation=name)
        strength = hp.space[0]
        assert (strength.min_value, strength.max_value) == perturbation.strength_range
        assert strength.default == perturbation.default_strength
        names = [p.name for p in hp.space]
        history = name.startswith("history")
        assert names == (["strength", "history_momentum"] if history else ["strength"])
        if history:
            momentum = hp.space[1]
            assert (momentum.min_value, momentum.max_value) == FIELDS["history_momentum"].metadata[
                "range"]

    # Extra knobs: a decade either side of the configured value, log scale.
    config = SimCLICConfig(base_lr=0.05)
    hp = hypermodel_module.search_space(config, ("loss", "base_lr", "weight_decay"))
    base_lr, weight_decay = hp.space[1], hp.space[2]
    assert (base_lr.min_value, base_lr.max_value) == pytest.approx((0.005, 0.5))
    assert base_lr.sampling == weight_decay.sampling == "log"
    assert weight_decay.default == config.weight_decay
    assert not hypermodel_module.is_discrete(hp) and hypermodel_module.is_discrete(space("loss"))
    # A perturbation trial takes each perturbation's own default strength.
    trial = keras_tuner.HyperParameters()
    trial.values = {"perturbation": "none"}
    assert hypermodel_module.trial_config(
        SimCLICConfig(strength=0.5), ("perturbation",), trial).strength is None
    # ...and its own default form: SimSiam's two views beside the default
    # one-view history, unless the views are given.
    simsiam = hypermodel_module.trial_config(SimCLICConfig(), ("perturbation",), trial)
    assert (simsiam.views, simsiam.strength_ramp) == (2, 0.0)
    trial.values = {"perturbation": "history"}
    assert hypermodel_module.trial_config(SimCLICConfig(views=2), ("perturbation",),
                                          trial).views == 2


def test_the_grid_starts_at_the_configured_value_and_covers_the_space():
    points = hypermodel_module.grid(space("predictor", predictor="mlp1"))
    assert points[0] == {"predictor": "mlp1"}
    assert sorted(p["predictor"] for p in points) == PREDICTORS.names()


@pytest.mark.e2e
def test_a_predictor_search_resumes_and_writes_the_paper_table(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "search"
    argv = TINY + ["--ablation", "predictor", "--perturbation", "none", "--epochs", "1",
                   "--linear-epochs", "5", "--run-dir", str(run_dir)]
    fits = FitCounter(monkeypatch)

    # Stopped after one trial (as an interrupted search would be) ...
    assert tune(argv + ["--max-trials", "1"]) == 0
    assert fits.values == [{"predictor": "mlp2"}]
    first = trial_json(run_dir, "0")
    assert first["status"] == "COMPLETED"
    errors = read_csv(run_dir / "results.csv")[1]
    assert errors[1:4] == ["", "", ""] and errors[4]  # only the 2-layer MLP's column
    assert "1 of 4 grid points completed" in (run_dir / "results.md").read_text()
    # ... then resumed: the finished trial is not run again.
    assert tune(argv) == 0
    assert sorted(v["predictor"] for v in fits.values[1:]) == ["fixed_random", "mlp1", "none"]
    assert trial_json(run_dir, "0") == first
    assert tune(argv) == 0  # nothing left to run
    assert len(fits.values) == 4

    # The paper's table: one column per predictor, error % and final z_std.
    rows = read_csv(run_dir / "results.csv")
    assert rows[0] == ["predictor", "No predictor", "Fixed random init", "1-layer MLP",
                       "2-layer MLP"]
    assert [row[0] for row in rows[1:]] == ["kNN error %", "final z_std", "final z_rank",
                                            "collapsed", "trial"]
    errors = [float(cell) for cell in rows[1][1:]]
    assert all(0 <= e <= 100 for e in errors)
    assert all(float(cell) >= 0 for row in rows[2:4] for cell in row[1:])
    markdown = (run_dir / "results.md").read_text()
    assert "## Effect of predictor h" in markdown
    assert ("| predictor | No predictor | Fixed random init | 1-layer MLP | 2-layer MLP |"
            in markdown)
    assert "Effect of predictor h" in capsys.readouterr().out
    trials = read_csv(run_dir / "trials.csv")
    assert trials[0][:3] == ["trial", "status", "predictor"] and len(trials) == 5
    assert "val_knn_accuracy" in trials[0] and "z_std" in trials[0]

    # TensorBoard: the HParams experiment at the root, a session per trial.
    experiment = hparams_events(run_dir / "logs")["_hparams_/experiment"].experiment
    assert [info.name for info in experiment.hparam_infos] == ["predictor"]
    assert sorted(v.string_value for v in experiment.hparam_infos[0].domain_discrete.values) \
        == PREDICTORS.names()
    assert ("validation", "epoch_knn_accuracy") in {
        (m.name.group, m.name.tag) for m in experiment.metric_infos}
    for trial_id in rows[-1][1:]:  # the "trial" row
        session = hparams_events(run_dir / "logs" / f"trial_{trial_id}")
        start = session["_hparams_/session_start_info"].session_start_info
        assert start.hparams["predictor"].string_value == trial_json(
            run_dir, trial_id)["hyperparameters"]["values"]["predictor"]
        assert "_hparams_/session_end_info" in session
        assert glob.glob(str(run_dir / "logs" / f"trial_{trial_id}" / "validation" / "events*"))

    # The best configuration trains with train.py.
    best = json.loads((run_dir / "best_config.json").read_text())
    best_trial = max(range(4), key=lambda i: float(trial_json(run_dir, str(i))["score"]))
    assert best["predictor"] == trial_json(run_dir, str(best_trial))["hyperparameters"][
        "values"]["predictor"]
    assert best["epochs"] == 1 and best["backbone"] == "tiny_convnet"
    assert train(["--config", str(run_dir / "best_config.json"), "--linear-epochs", "0",
                       "--run-dir", str(tmp_path / "best")]) == 0
    report = json.loads((tmp_path / "best" / "report.json").read_text())
    assert report["config"]["predictor"] == best["predictor"]


@pytest.mark.e2e
def test_without_stop_gradient_the_representation_collapses(tmp_path):
    """SimSiam on a budget where the collapse is clear, and the alarm says so.
    Ten runs (seeds 0 to 3, three machines; same-seed runs are not
    bit-identical) gave kNN errors 8 to 70 points above the run with
    stop-gradient (180 validation images), while z_std mostly stayed above its alarm: the projector's
    output BatchNorm holds each dimension's batch variance at 1. The collapse
    is dimensional, and z_rank sees it: 0.07 to 0.08 without stop-gradient,
    0.59 to 0.64 with it (three runs of seed 0 here)."""
    run_dir = tmp_path / "search"
    assert tune(TINY + [
        "--ablation", "stop_gradient", "--perturbation", "none", "--base-lr", "1.0",
        # The predictor at the encoder's rate and float32, as in the ten runs above.
        "--pred-lr-scale", "1", "--no-fix-pred-lr", "--precision", "float32", "--epochs", "8",
        "--run-dir", str(run_dir)]) == 0
    rows = {row[0]: row[1:] for row in read_csv(run_dir / "results.csv")}
    assert read_csv(run_dir / "results.csv")[0] == [
        "stop_gradient", "w/ stop-gradient", "w/o stop-gradient"]
    with_sg, without_sg = map(float, rows["final z_rank"])
    assert without_sg < COLLAPSED_RANK < with_sg
    assert rows["collapsed"] == ["no", "yes"]
    error_with, error_without = map(float, rows["kNN error %"])
    assert error_without > error_with + 5
    assert json.loads((run_dir / "best_config.json").read_text())["stop_gradient"] is True


class Crash(Exception):
    pass


@pytest.mark.e2e
def test_an_interrupted_trial_resumes_at_its_last_epoch(tmp_path, monkeypatch):
    run_dir = tmp_path / "search"
    argv = TINY + ["--ablation", "loss", "--perturbation", "none", "--epochs", "2",
                   "--run-dir", str(run_dir)]
    epochs_run = []

    def crash_in_second_trial(self, epoch, logs=None):
        epochs_run.append(epoch)
        if len(epochs_run) == 4:  # the second trial's second epoch
            raise Crash()

    with monkeypatch.context() as patch:
        patch.setattr(hypermodel_module.ValidationMonitor, "on_epoch_begin",
                      crash_in_second_trial, raising=False)
        with pytest.raises(keras_tuner.errors.FatalError, match="trial 1"):
            tune(argv)
        assert trial_json(run_dir, "1")["status"] == "RUNNING"
        assert (run_dir / "tuner" / "trial_1" / "backup").exists()
        assert tune(argv) == 0
    # The rerun trained the second trial's second epoch, then the third trial.
    assert epochs_run == [0, 1, 0, 1, 1, 0, 1]
    assert [trial_json(run_dir, i)["status"] for i in "012"] == ["COMPLETED"] * 3
    assert not (run_dir / "tuner" / "trial_1" / "backup").exists()
    assert read_csv(run_dir / "results.csv")[0] == ["loss", "Cosine", "Cross-entropy", "NT-Xent"]


@pytest.mark.e2e
def test_a_strength_search_is_bayesian_and_resumes(tmp_path, monkeypatch):
    run_dir = tmp_path / "search"
    argv = TINY + ["--ablation", "strength", "--perturbation", "noise", "--epochs", "1",
                   "--objective", "linear", "--linear-epochs", "5", "--run-dir", str(run_dir)]
    fits = FitCounter(monkeypatch)
    assert tune(argv + ["--max-trials", "1"]) == 0
    # Resumed with the short form: the settings come from the run directory.
    assert tune(["--run-dir", str(run_dir), "--max-trials", "2", "--quiet"]) == 0
    assert len(fits.values) == 2 and fits.values[0] != fits.values[1]
    assert fits.values[0] == {"strength": PERTURBATIONS.get("noise").default_strength}
    assert "num_initial_points" in json.loads(  # a BayesianOptimizationOracle's state
        (run_dir / "tuner" / "oracle.json").read_text())
    rows = read_csv(run_dir / "results.csv")
    assert rows[0] == ["strength", "kNN error %", "linear error %", "final z_std", "final z_rank",
                       "collapsed", "trial"]
    assert [float(r[0]) for r in rows[1:]] == sorted(float(v["strength"]) for v in fits.values)
    best = SimCLICConfig.load(run_dir / "best_config.json")
    lowest = min(float(r[2]) for r in rows[1:])  # linear error
    assert best.perturbation == "noise"
    assert best.strength in [float(r[0]) for r in rows[1:] if float(r[2]) == lowest]


def epoch_scalars(log_dir, tag):
    """The values of the scalar `tag` in a TensorBoard log directory, by step."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray
    found = {}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents*")):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.tag == tag:
                    found[event.step] = float(make_ndarray(value.tensor))
    return [found[step] for step in sorted(found)]


@pytest.mark.e2e
def test_a_trial_ramps_the_history_mix_as_simclic_train_does(tmp_path):
    run_dir = tmp_path / "search"
    argv = TINY + ["--ablation", "strength", "--perturbation", "history", "--epochs", "2",
                   "--strength-ramp", "0.5", "--max-trials", "1", "--run-dir", str(run_dir)]
    assert tune(argv) == 0
    (trial_logs,) = glob.glob(str(run_dir / "logs" / "trial_*" / "train"))
    first, last = epoch_scalars(trial_logs, "epoch_mix")
    strength = trial_json(run_dir, "0")["hyperparameters"]["values"]["strength"]
    # The ramp spans the first epoch: its last step is one step short of the top.
    assert 0.8 * strength < first < strength and last == pytest.approx(strength)


def test_a_trial_stops_on_collapse_when_asked(tmp_path):
    base = SimCLICConfig(dataset="digits", backbone="tiny_convnet", width=4, proj_dim=32,
                         pred_hidden=8, batch_size=64, epochs=1, stop_on_collapse=True)
    train_set, validation = hypermodel_module.validation_split(
        sources.load_train_and_eval(base)[0], 0.1, seed=0)
    model = hypermodel_module.SimCLICHyperModel(base, ("loss",), train_set, validation)
    model.build(space("loss"))
    assert model.pretraining.collapse_monitor.stop


def test_bad_searches_are_clear_errors(tmp_path, capsys):
    def error(argv):
        with pytest.raises(SystemExit) as exit_info:
            tune(TINY + argv)
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert "--perturbation none has no strength" in error(
        ["--ablation", "strength", "--perturbation", "none", "--run-dir", str(tmp_path / "a")])
    assert "--ablation is needed" in error(["--run-dir", str(tmp_path / "b")])
    assert "--views 1" in error(["--ablation", "perturbation", "--views", "1",
                                 "--run-dir", str(tmp_path / "c")])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "search.json").write_text(json.dumps({
        "ablation": "loss", "tune": [], "objective": "knn", "val_fraction": 0.1,
        "config": SimCLICConfig(epochs=3).to_dict()}))
    message = error(["--ablation", "loss", "--epochs", "4", "--run-dir", str(tmp_path / "d")])
    assert "--epochs 4 (saved: 3)" in message and "--overwrite" in message
    # Flags apply over the saved search's config (a noise search), not the defaults'.
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "search.json").write_text(json.dumps({
        "ablation": "loss", "tune": [], "objective": "knn", "val_fraction": 0.1,
        "config": SimCLICConfig(perturbation="noise").to_dict()}))
    message = error(["--strength", "5", "--run-dir", str(tmp_path / "e")])
    assert "--strength 5.0 (saved: None)" in message


def test_the_table_marks_variants_not_run_yet():
    records = [
        {"trial_id": "0", "status": "COMPLETED", "values": {"predictor": "mlp2"},
         "metrics": {"val_knn_accuracy": 0.8, "z_std": 0.02, "z_rank": 0.5}},
        {"trial_id": "1", "status": "COMPLETED", "values": {"predictor": "none"},
         "metrics": {"val_knn_accuracy": 0.1, "z_std": 0.02, "z_rank": 0.05}},
        {"trial_id": "2", "status": "RUNNING", "values": {"predictor": "mlp1"}, "metrics": {}},
    ]
    title, header, rows = table.discrete_table(
        "predictor", PREDICTORS.names(), records, "knn", CollapseMonitor(32))
    assert title == "Effect of predictor h"
    assert header[1:] == ["No predictor", "Fixed random init", "1-layer MLP", "2-layer MLP"]
    assert rows[0][1:] == [pytest.approx(90.0), None, None, pytest.approx(20.0)]
    assert rows[3][1:] == ["yes", None, None, "no"]  # z_rank 0.05 is a collapse
    text = table.markdown(title, header, rows)
    assert "| kNN error % | 90.00 | - | - | 20.00 |" in text
    assert "| final z_rank | 0.0500 | - | - | 0.5000 |" in text
    assert table.best_record(records)["trial_id"] == "0"
