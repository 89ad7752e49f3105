"""The report's verdict: one sentence that says whether pretraining helped."""

import re

import pytest

from simclic_tf import SimCLICConfig
from simclic_tf.report import hparam_values, markdown, tensorboard_metrics, verdict


def report_with(knn, linear, random_knn, random_linear, num_classes=10):
    return {
        "config": SimCLICConfig(pred_lr_scale=30.0).to_dict(),
        "data": {"train_images": 3000, "test_images": 1000, "image_shape": [16, 16, 3],
                 "num_classes": num_classes},
        "pretrained": {"knn_accuracy": knn, "linear_accuracy": linear},
        "random_init": {"knn_accuracy": random_knn, "linear_accuracy": random_linear},
        "final_loss": -0.5, "final_z_std": 0.044, "final_z_rank": 0.6, "collapsed_at_epoch": None,
        "train_seconds": 100.0, "steps": 460, "derived": {"pred_lr_scale": 30.0},
    }


def percents(sentence):
    return [float(x) for x in re.findall(r"(-?[+]?\d+\.\d) (?:%|points)", sentence)]


def test_the_verdict_of_a_run_that_learned_gives_its_numbers():
    sentence = verdict(report_with(0.312, 0.45, 0.272, 0.41))
    assert sentence.startswith("Pretraining improved the encoder")
    assert percents(sentence) == [27.2, 31.2, 4.0, 41.0, 45.0, 4.0, 10.0]
    assert "lower is better" in sentence and "--recipe" not in sentence


def test_the_chance_of_an_unlabelled_training_set_is_its_evaluation_sets():
    report = report_with(0.312, 0.45, 0.272, 0.41, num_classes=0)
    report["data"]["knn_classes"] = 5
    assert "chance is 20.0 % (5 classes)" in verdict(report)


@pytest.mark.parametrize("knn, linear", [(0.25, 0.45), (0.30, 0.40), (0.272, 0.41)])
def test_the_verdict_of_a_run_that_did_not_learn_says_so_and_what_to_try(knn, linear):
    sentence = verdict(report_with(knn, linear, 0.272, 0.41, num_classes=4))
    assert sentence.startswith("Pretraining did not improve the encoder")
    assert percents(sentence)[:2] == [27.2, round(100 * knn, 1)]
    assert "chance is 25.0 % (4 classes)" in sentence
    assert "--epochs" in sentence and "--recipe cpu" in sentence
    assert "lower is better" in sentence


def test_the_report_opens_with_the_verdict_and_lists_the_derived_knobs():
    report = report_with(0.312, 0.45, 0.272, 0.41)
    lines = markdown(report).splitlines()
    assert lines[0] == "# SimCLIC run: shapes"
    assert lines[2] == verdict(report)
    assert lines[4].startswith("| encoder |") and "| pretrained | 68.80 | 55.00 |" in lines
    assert any("460 steps" in line and "--pred-lr-scale 30.0" in line for line in lines)


def test_a_diverged_run_reports_where_and_no_pretrained_numbers():
    report = report_with(0.0, 0.0, 0.272, 0.41)
    for key in ("pretrained", "final_loss", "final_z_std", "final_z_rank", "collapsed_at_epoch"):
        del report[key]
    report["diverged"] = {"epoch": 3, "step": 7, "what": "the loss (nan)"}
    sentence = verdict(report)
    assert sentence.startswith("Pretraining diverged at epoch 3, step 7 (the loss (nan)")
    assert "nothing was exported" in sentence and "--base-lr (this run: 0.12)" in sentence
    text = markdown(report)
    assert "| random initialisation | 72.80 | 59.00 |" in text and "| pretrained |" not in text


def test_tensorboard_gets_the_reports_error_rates_as_fractions():
    report = report_with(0.75, 0.5, 0.25, 0.375)
    report["pretrained"]["finetune_accuracy"] = 0.875
    report["random_init"]["finetune_accuracy"] = 0.625
    report["online_probe_accuracy"] = 0.5625
    assert tensorboard_metrics(report) == {
        "final/knn_error": 0.25, "final/linear_error": 0.5, "final/finetune_error": 0.125,
        "final/online_probe_error": 0.4375, "random_init/knn_error": 0.75,
        "random_init/linear_error": 0.625, "random_init/finetune_error": 0.375}


def test_a_diverged_run_gives_tensorboard_its_random_init_errors_only():
    report = report_with(0.0, 0.0, 0.25, 0.375)
    del report["pretrained"]
    report["diverged"] = {"epoch": 3, "step": 7, "what": "the loss (nan)"}
    assert tensorboard_metrics(report) == {"random_init/knn_error": 0.75,
                                           "random_init/linear_error": 0.625}


def test_hparams_are_every_knob_but_run_dir_with_none_spelled_out():
    from tensorboard.plugins.hparams import api as hparams_api

    config = SimCLICConfig(image_size=None, jit=True, strength=0.5).to_dict()
    values = hparam_values(config)
    assert set(values) == set(config) - {"run_dir"}
    assert (values["image_size"], values["eval_dataset"], values["jit"]) == ("none", "none", True)
    assert {name: value for name, value in values.items() if value != "none"} == {
        name: value for name, value in config.items()
        if value is not None and name != "run_dir"}
    hparams_api.hparams_pb(values)  # raises on a value HParams does not accept
