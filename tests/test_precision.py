"""--precision auto (the policy that follows the hardware) and --jit on a
CPU (which says what it costs)."""

import json

import keras
import pytest
import tensorflow as tf

from simclic_tf import distribute
from simclic_tf.commands import train

from test_cli import TINY


@pytest.mark.parametrize("flags, picked", [({"amx_bf16", "avx512f"}, "mixed_bfloat16"),
                                           ({"avx512_bf16"}, "mixed_bfloat16"),
                                           ({"avx2", "avx512f"}, "float32"), (set(), "float32")])
def test_auto_precision_follows_the_cpus_bfloat16_flags(monkeypatch, flags, picked):
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    monkeypatch.setattr(distribute, "cpu_flags", lambda: flags)
    policy, why = distribute.pick_precision()
    assert policy == picked
    assert ("natively" in why) == (picked == "mixed_bfloat16")


@pytest.mark.parametrize("capability, picked", [((8, 0), "mixed_bfloat16"),
                                                ((9, 0), "mixed_bfloat16"),
                                                ((7, 5), "float32")])
def test_auto_precision_follows_the_gpus_capability(monkeypatch, capability, picked):
    gpu = tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [gpu])
    monkeypatch.setattr(tf.config.experimental, "get_device_details",
                        lambda device: {"compute_capability": capability})
    monkeypatch.setattr(distribute, "cpu_flags", lambda: {"amx_bf16"})  # the GPU decides
    assert distribute.pick_precision()[0] == picked


@pytest.mark.parametrize("flags, picked", [({"amx_bf16"}, "mixed_bfloat16"),
                                           ({"avx2"}, "float32")])
def test_what_auto_picked_is_in_config_json_and_the_report(tmp_path, monkeypatch, flags,
                                                           picked):
    monkeypatch.setattr(distribute, "cpu_flags", lambda: flags)
    run_dir = tmp_path / "run"
    try:
        assert train(TINY + ["--epochs", "1", "--linear-epochs", "0", "--run-dir",
                             str(run_dir)]) == 0
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert json.loads((run_dir / "config.json").read_text())["precision"] == picked
    report = json.loads((run_dir / "report.json").read_text())
    assert report["precision_pick"].startswith(picked + ": ")
    assert f"precision {picked}: " in (run_dir / "report.md").read_text()


def test_jit_on_a_cpu_only_run_says_how_much_slower_it_is(monkeypatch, caplog):
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    strategy = tf.distribute.get_strategy()
    assert distribute.jit_compile(True, strategy) is True
    assert f"about {distribute.JIT_CPU_SLOWDOWN}x slower" in caplog.text
    assert distribute.JIT_CPU_SLOWDOWN > 1
    caplog.clear()
    assert distribute.jit_compile(None, strategy) == "auto"  # Keras's auto: off on a CPU
    assert distribute.jit_compile(False, strategy) is False
    assert not caplog.text


def test_jit_with_a_gpu_says_nothing(monkeypatch, caplog):
    gpu = tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [gpu])
    assert distribute.jit_compile(True, tf.distribute.get_strategy()) is True
    assert not caplog.text
