import pytest

from simclic_tf import ConfigError, SimCLICConfig


def test_defaults_are_the_design_recipe():
    config = SimCLICConfig()
    assert (config.backbone, config.proj_dim, config.pred_hidden, config.batch_size) == (
        "resnet18_cifar", 2048, 512, 128)
    assert config.learning_rate == pytest.approx(0.03 * 128 / 256)


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
