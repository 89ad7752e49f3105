import functools
import json
import os

import numpy as np
import pytest

from simclic_tf import ConfigError, SimCLICConfig
from simclic_tf.config import RECIPE_DIR, derive_pred_lr_scale, recipe_names
from simclic_tf.finetune import FineTuneConfig
from simclic_tf.transfer import TransferConfig
from simclic_tf.tuning.search import Search


def test_defaults_are_the_small_image_recipe():
    config = SimCLICConfig()
    assert (config.dataset, config.backbone, config.width, config.proj_dim,
            config.pred_hidden, config.batch_size) == ("shapes", "resnet18_cifar", 16, 512,
                                                       128, 128)
    assert config.learning_rate == pytest.approx(0.12 * 128 / 256)
    assert config.fix_pred_lr and config.pred_lr_scale is None  # derived from the budget


def test_the_default_form_is_one_view_ramped_for_a_history_target():
    config = SimCLICConfig()
    assert (config.perturbation, config.perturb, config.views, config.strength_ramp) == (
        "history", "target", 1, 0.5)
    # The history perturbations the ramp applies to take the form too.
    assert SimCLICConfig(perturbation="history+dropout").views == 1
    # Where the form does not apply, two views and a constant strength.
    for changes in (dict(perturbation="none"), dict(perturbation="dropout"),
                    dict(perturb="online"), dict(target_momentum=0.99),
                    dict(second_view_size=16)):
        derived = SimCLICConfig(**changes)
        assert (derived.views, derived.strength_ramp) == (2, 0.0), changes
    # One view asked for gets the ramp; two views, none; a value given is kept.
    assert SimCLICConfig(views=1, perturb="target").strength_ramp == 0.5
    assert SimCLICConfig(views=2).strength_ramp == 0.0
    assert SimCLICConfig(views=1, perturb="online").strength_ramp == 0.0
    assert (SimCLICConfig(strength_ramp=0.75).views, SimCLICConfig(views=2, strength_ramp=0.25)
            .strength_ramp) == (1, 0.25)


def test_replace_and_methods_derive_the_form_again():
    config = SimCLICConfig()
    # What the config derived follows the knobs changed...
    assert (config.replace(perturbation="none").views,
            config.replace(perturbation="none").strength_ramp) == (2, 0.0)
    assert config.replace(perturbation="none").replace(perturbation="history") == config
    for method in ("simsiam", "byol", "simclr", "nnsiam"):
        assert (config.for_method(method).views, config.for_method(method).strength_ramp) == (
            2, 0.0), method
    # ...what was given stays: --views 2 is kept through a change of perturbation.
    two_views = SimCLICConfig(views=2).replace(perturbation="dropout").replace(
        perturbation="history")
    assert (two_views.views, two_views.strength_ramp) == (2, 0.0)
    # A saved config holds the values derived: loading it is the same run.
    assert json.loads(json.dumps(config.to_dict()))["views"] == 1


def test_the_predictor_rate_is_derived_from_the_run_length():
    assert derive_pred_lr_scale(100) == derive_pred_lr_scale(1560) == 30.0
    assert derive_pred_lr_scale(300_000) == derive_pred_lr_scale(10**7) == 1.0
    steps = [780, 3120, 39_000, 390_000]
    factors = [derive_pred_lr_scale(n) for n in steps]
    assert factors == sorted(factors, reverse=True) and 1.0 < factors[2] < factors[1] < 30.0
    config, derived = SimCLICConfig(epochs=10).for_budget(steps_per_epoch=312)
    assert derived == {"pred_lr_scale": derive_pred_lr_scale(3120)}
    assert config.pred_lr_scale == derived["pred_lr_scale"]
    # A value given explicitly is the user's: nothing is derived over it.
    assert SimCLICConfig(pred_lr_scale=2.0).for_budget(10) == (
        SimCLICConfig(pred_lr_scale=2.0), {})


def test_the_shipped_recipes_load_and_validate():
    assert {"paper", "cifar", "cpu"} <= set(recipe_names())
    for name in recipe_names():
        values = json.loads((RECIPE_DIR / f"{name}.json").read_text())
        config = SimCLICConfig.recipe(name)
        assert {key: getattr(config, key) for key in values} == values
    paper = SimCLICConfig.recipe("paper")
    assert (paper.epochs, paper.batch_size, paper.width, paper.proj_dim) == (1000, 128, 64, 2048)
    # The paper's two-view history; the cpu recipe, SimSiam's target, which
    # led the one-view form at its length on CIFAR-10 (README, Recipes).
    assert (paper.views, paper.strength_ramp) == (2, 0.0)
    cpu = SimCLICConfig.recipe("cpu")
    assert (cpu.perturbation, cpu.views, cpu.strength_ramp) == ("none", 2, 0.0)


def test_an_unknown_recipe_names_the_shipped_ones():
    with pytest.raises(ConfigError, match="--recipe 'fast'.*cifar, cpu, paper"):
        SimCLICConfig.recipe("fast")


@pytest.mark.parametrize("changes, names", [
    ({"views": 1, "perturbation": "none"}, ["--views 1", "--perturbation"]),
    ({"perturbation": "dropout", "strength": 1.5}, ["--strength 1.5", "0.0 to 0.95"]),
    ({"perturbation": "history", "strength": -0.1}, ["--strength", "0.0 to 1.0"]),
    ({"perturbation": "none", "strength": 0.3}, ["--strength", "none"]),
    ({"predictor": "mlp3"}, ["--predictor 'mlp3'", "mlp1", "mlp2", "fixed_random"]),
    ({"perturbation": "blur"}, ["--perturbation 'blur'", "history"]),
    ({"views": 3}, ["--views 3", "1, 2"]),
    ({"history_momentum": 1.0}, ["--history-momentum 1.0", "0.0 to 0.999"]),
    ({"bank_dtype": "float16"}, ["--bank-dtype", "bfloat16"]),
])
def test_bad_knobs_name_the_flag_and_what_is_accepted(changes, names):
    with pytest.raises(ConfigError) as error:
        SimCLICConfig(**changes)
    for name in names:
        assert name in str(error.value)


def test_round_trip_through_json(tmp_path):
    config = SimCLICConfig(perturbation="noise", strength=0.3, views=1, stop_gradient=False)
    config.save(tmp_path / "config.json")
    assert SimCLICConfig.load(tmp_path / "config.json") == config


def test_unknown_keys_in_a_config_file_are_named(tmp_path):
    (tmp_path / "config.json").write_text('{"batch": 3}')
    with pytest.raises(ConfigError, match="batch"):
        SimCLICConfig.load(tmp_path / "config.json")



SEARCH = functools.partial(Search, SimCLICConfig())
TRANSFER = functools.partial(TransferConfig, encoder="runs/a/encoder.keras", datasets="digits")


@pytest.mark.parametrize("make, changes, names", [
    (SEARCH, {"ablation": "loss", "val_fraction": 0.95},
     ["--val-fraction 0.95 is out of range", "0.01 to 0.9"]),
    (SEARCH, {"ablation": "loss", "max_trials": 0}, ["--max-trials 0 is out of range"]),
    (SEARCH, {"ablation": "loss", "tune": ["momentum"]},
     ["--tune 'momentum' is not accepted", "base_lr, weight_decay"]),
    (SEARCH, {"ablation": "blur"}, ["--ablation 'blur' is not accepted", "predictor"]),
    (TRANSFER, {"test_fraction": 0.0}, ["--test-fraction 0.0 is out of range", "0.01 to 0.9"]),
    (TRANSFER, {"linear_epochs": -1}, ["--linear-epochs -1 is out of range", "0 to 100000"]),
    (TRANSFER, {"encoder": None}, ["--encoder None is not accepted; expected a string"]),
    (FineTuneConfig, {"backbone_lr_scale": -0.5},
     ["--backbone-lr-scale -0.5 is out of range", "0.0 to 1000.0"]),
    (FineTuneConfig, {"crop_min_scale": 1.5}, ["--crop-min-scale 1.5 is out of range"]),
])
def test_the_other_settings_reject_bad_values_naming_the_flag(make, changes, names):
    """The search's, transfer's and fine-tuning's settings are checked as the
    config is (knobs.Knobs), with the same messages."""
    with pytest.raises(ConfigError) as error:
        make(**changes)
    for name in names:
        assert name in str(error.value)


def test_the_other_settings_hold_python_values_and_share_the_configs_knobs():
    search = SEARCH(ablation="loss", tune=["base_lr"], max_trials=np.int64(3))
    assert search.tune == ("base_lr",) and type(search.max_trials) is int
    transfer = TRANSFER(seed=3)
    assert (transfer.linear_epochs, transfer.test_fraction) == (
        SimCLICConfig().linear_epochs, SimCLICConfig().test_fraction)
    assert transfer.out_dir == os.path.abspath("runs/a/transfer")
    assert FineTuneConfig(batch_size=64).replace(flip=False) == FineTuneConfig(
        batch_size=64, flip=False)


def test_a_second_view_size_needs_two_views():
    with pytest.raises(ConfigError, match="--second-view-size 16 needs --views 2 "
                                          r"\(given --views 1\)"):
        SimCLICConfig(perturbation="history", views=1, second_view_size=16)
