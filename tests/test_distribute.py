"""tf.distribute: a MirroredStrategy over two logical CPU devices trains
exactly as one device on the same global batch (history rows included), a
run resumes under it, and the Scale knobs. The two-device checks run in
subprocesses (tests/distributed_step.py, tests/distributed_train.py): logical
devices must be configured before TensorFlow initialises them, and the rest
of the suite keeps its single device."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from simclic_tf import compat, distribute
from simclic_tf.cli import add_config_flags, config_from_args
from simclic_tf.config import ConfigError, SimCLICConfig

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_helper(script, args, env=None, timeout=300):
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, script), *map(str, args)],
        cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
        capture_output=True, text=True, timeout=timeout)
    return result


def check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def test_the_strength_ramp_moves_every_replicas_mix_alike(tmp_path):
    out = tmp_path / "ramp.json"
    check(run_helper("ramp_mirrored.py", [out]))
    result = json.loads(out.read_text())
    np.testing.assert_allclose(result["mixes"], [0.0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8, 0.8],
                               rtol=1e-6)
    assert result["copies"] == pytest.approx([0.8, 0.8])


def test_a_budgets_timing_is_undone_on_every_replica_and_the_length_fitted_after(tmp_path):
    out = tmp_path / "budget.json"
    check(run_helper("budget_mirrored.py", [out]))
    for layout, result in json.loads(out.read_text()).items():
        assert result["moved"] > 0.01, layout  # the timed steps changed the copies
        assert result["left"] == 0.0, layout  # and every copy is back
        # Fitted to 8 steps, the ramp's half is 4: the traced step follows.
        np.testing.assert_allclose(result["mixes"], [0.0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8, 0.8],
                                   rtol=1e-6, err_msg=layout)


@pytest.mark.parametrize("precision, tolerance", [("float32", 1e-4),
                                                  ("mixed_float16", 2e-2)])
def test_two_replicas_train_as_one_device(tmp_path, precision, tolerance):
    """Two steps, the second re-reading rows of the first with index 4 on both
    replicas: the same losses, z_std, weights and history rows as one device,
    and both replicas' copies of the buffer bit-identical. With --sync-bn
    (every BatchNorm over the global batch) this is exact up to float
    summation order; without it, each replica normalises its own half."""
    out = tmp_path / "step.json"
    check(run_helper("distributed_step.py", [out, "--precision", precision]))
    result = json.loads(out.read_text())
    single, mirrored = result["single"], result["mirrored"]
    assert result["replicas"] == 2
    for a, b in zip(single["logs"], mirrored["logs"]):
        np.testing.assert_allclose(a["loss"], b["loss"], atol=tolerance)
        np.testing.assert_allclose(a["z_std"], b["z_std"], atol=tolerance)
    for a, b in zip(single["weights"], mirrored["weights"]):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=tolerance)
    np.testing.assert_allclose(np.array(single["bank"]), np.array(mirrored["bank"]),
                               atol=tolerance)
    assert single["visits"] == mirrored["visits"]
    # Duplicate 4 (once per replica) counted once per step, as on one device.
    assert mirrored["visits"][:12] == [1, 1, 1, 2, 2, 2, 2, 2, 0, 1, 1, 0]
    first, second = (np.array(bank) for bank in mirrored["replica_banks"])
    assert (first == second).all() and np.abs(first).sum() > 0


def test_a_sharded_history_bank_trains_as_one_device(tmp_path):
    """--bank-layout sharded on two replicas, the same two steps as above:
    each replica holds ceil(N / 2) + 1 rows (the last a scratch row), replica
    r the rows i with i % 2 == r at i // 2; interleaved back, the shards are
    the single-device buffer, visits included, and the losses match, those
    of an evaluation pass (which reads the rows from every shard) too. A
    `.keras` file holds the logical buffer: the mirrored model's loads on one
    device, the single-device model's loads sharded."""
    out = tmp_path / "step.json"
    check(run_helper("distributed_step.py", [out, "--bank-layout", "sharded"]))
    result = json.loads(out.read_text())
    single, mirrored = result["single"], result["mirrored"]
    for a, b in zip(single["logs"], mirrored["logs"]):
        np.testing.assert_allclose(a["loss"], b["loss"], atol=1e-4)
    # Evaluation reads the trained rows (the target is mostly the old row).
    np.testing.assert_allclose(single["eval_loss"], mirrored["eval_loss"], atol=1e-4)
    bank = np.array(single["bank"])
    rows, dim = bank.shape[0] // 2 + 1, bank.shape[1]
    shards = [np.array(shard) for shard in mirrored["replica_banks"]]
    assert [shard.shape for shard in shards] == [(rows, dim)] * 2 == [(mirrored["rows"], dim)] * 2
    interleaved = np.stack([shard[:-1] for shard in shards], axis=1).reshape(-1, dim)
    np.testing.assert_array_equal(np.array(mirrored["bank"]), interleaved)
    np.testing.assert_allclose(interleaved, bank, atol=1e-4)
    assert mirrored["visits"] == single["visits"]
    assert np.abs(bank).sum() > 0 and single["rows"] == len(bank)
    on_one_device, on_mirrored = result["mirrored_on_one_device"], result["single_on_mirrored"]
    assert (on_one_device["rows"], on_mirrored["rows"]) == (len(bank), rows)
    np.testing.assert_array_equal(np.array(on_one_device["bank"]), interleaved)
    np.testing.assert_array_equal(np.array(on_mirrored["bank"]), bank)
    assert on_one_device["visits"] == on_mirrored["visits"] == single["visits"]


@pytest.mark.e2e
def test_a_run_resumes_under_a_mirrored_strategy(tmp_path):
    run_dir = tmp_path / "run"
    argv = ["--dataset", "digits", "--backbone", "tiny_convnet", "--width", "4",
            "--proj-dim", "32", "--pred-hidden", "8", "--batch-size", "64", "--linear-epochs", "0",
            "--knn-every", "0", "--epochs", "3", "--strategy", "mirrored", "--sync-bn",
            "--run-dir", run_dir]
    crashed = run_helper("distributed_train.py", argv, {"SIMCLIC_TEST_CRASH_AT_EPOCH": "2"})
    assert crashed.returncode == 3, crashed.stderr[-5000:]
    assert (run_dir / "backup").exists() and not (run_dir / "report.json").exists()
    state_file = tmp_path / "state.json"
    check(run_helper("distributed_train.py", ["--run-dir", run_dir, "--resume"],
                     {"SIMCLIC_TEST_STATE": str(state_file)}))
    state = json.loads(state_file.read_text())
    steps = 3 * (1437 // 64)
    assert state["replicas"] == 2 and state["banks_equal"]
    assert state["iterations"] == steps
    # Every replica's copy holds the writes of all three epochs, the first two
    # restored from the checkpoint.
    assert [sum(v) for v in state["visits"]] == [steps * 64] * 2
    model = keras.models.load_model(run_dir / "model.keras", safe_mode=True)
    assert ops.convert_to_numpy(model.perturbation.visits).sum() == steps * 64
    assert model.config.strategy == "mirrored" and model.config.sync_bn


def test_scale_knobs_are_config_fields_and_flags():
    import argparse
    parser = add_config_flags(argparse.ArgumentParser())
    config = config_from_args(parser.parse_args(
        ["--strategy", "mirrored", "--sync-bn", "--precision", "mixed_bfloat16", "--no-jit"]))
    assert (config.strategy, config.sync_bn, config.precision, config.jit) == (
        "mirrored", True, "mixed_bfloat16", False)
    assert SimCLICConfig().jit is None and SimCLICConfig().strategy == "auto"
    with pytest.raises(ConfigError, match="--strategy"):
        SimCLICConfig(strategy="horovod")
    with pytest.raises(ConfigError, match="--precision"):
        SimCLICConfig(precision="float16")


def test_make_strategy_and_jit():
    default = distribute.make_strategy("default")
    assert default.num_replicas_in_sync == 1
    if len(tf.config.list_physical_devices("GPU")) < 2:
        assert distribute.make_strategy("auto").num_replicas_in_sync == 1
    assert distribute.jit_compile(None, default) == "auto"
    assert distribute.jit_compile(True, default) is True
    one = tf.distribute.MirroredStrategy(["/cpu:0"])
    assert distribute.jit_compile(False, one) is False


def test_no_tpu_is_a_clear_error(monkeypatch):
    def no_tpu(*args, **kwargs):
        raise ValueError("Please provide a TPU Name to connect to.")

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", no_tpu)
    with pytest.raises(ConfigError, match="--strategy tpu: no TPU found"):
        distribute.make_strategy("tpu")


def test_sync_bn_makes_every_batch_norm_cross_replica():
    from simclic_tf import SimCLIC
    config = SimCLICConfig(backbone="tiny_convnet", width=4, proj_dim=16, pred_hidden=8,
                           sync_bn=True)
    model = SimCLIC(config, (8, 8, 3), 10)
    norms = [layer for layer in compat.all_layers(model)
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 3 + 2 + 1 and all(layer.synchronized for layer in norms)
    # Saved with the encoder: it loads as a stock Keras layer.
    assert model.backbone.get_layer("conv1_bn").get_config()["synchronized"]


def test_mixed_precision_keeps_loss_and_history_in_float32():
    from simclic_tf import SimCLIC, build_optimizer
    config = SimCLICConfig(backbone="tiny_convnet", width=4, proj_dim=16, pred_hidden=8,
                           precision="mixed_float16", batch_size=8, jit=False)
    try:
        distribute.set_precision(config.precision)
        model = SimCLIC(config, (8, 8, 3), 16)
        model.compile(optimizer=build_optimizer(config, 2), jit_compile=False)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        views = np.random.default_rng(0).random((2, 8, 8, 8, 3), dtype="float32")
        data = tf.data.Dataset.from_tensors(((views[0], views[1]), np.arange(8, dtype="int32")))
        history = model.fit(data.repeat(2), shuffle=False, verbose=0)
        assert np.isfinite(history.history["loss"][-1])
        assert model.perturbation.bank.dtype == "float32"
        assert ops.convert_to_numpy(model.perturbation.visits)[:8].tolist() == [2] * 8
    finally:
        distribute.set_precision("float32")


def free_ports(count):
    import socket
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_two_workers(arguments, timeout=240):
    """Runs `arguments(i)` (a command line after the interpreter) as worker i
    of a two-worker MultiWorkerMirroredStrategy cluster on 127.0.0.1, both at
    once; asserts both succeed."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    processes = [
        subprocess.Popen(
            [sys.executable, *map(str, arguments(i))], cwd=ROOT,
            env={**env, "TF_CONFIG": json.dumps(
                {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    logs = []
    try:
        for process in processes:
            logs.append(process.communicate(timeout=timeout)[0])
    finally:
        for process in processes:  # Never leave a worker behind (a hang, a failure).
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-5000:]


@pytest.mark.e2e
def test_two_workers_on_loopback_keep_identical_history_buffers(tmp_path):
    """Two MultiWorkerMirroredStrategy processes on 127.0.0.1, a few steps on
    digits: both workers end with the same (non-trivial) buffer, holding the
    writes of the whole global batch. Wall times are printed, not asserted."""
    import time
    script = os.path.join(HERE, "multi_worker.py")
    outs = [tmp_path / f"worker{i}.npz" for i in range(2)]
    start = time.time()
    run_two_workers(lambda i: [script, outs[i], "--steps", "6"])
    two_workers = time.time() - start
    start = time.time()
    check(run_helper("multi_worker.py", [tmp_path / "single.npz", "--steps", "6"],
                     timeout=240))
    one_worker = time.time() - start
    first, second = (np.load(out) for out in outs)
    assert int(first["replicas"]) == 2
    assert first["visits"].sum() == 6 * 32  # Each step writes the global batch of 32.
    np.testing.assert_array_equal(first["visits"], second["visits"])
    np.testing.assert_array_equal(first["bank"], second["bank"])
    assert np.abs(first["bank"]).sum() > 0
    print(f"\n6 steps on digits, batch 32: two workers {two_workers:.1f} s "
          f"(training {float(first['seconds']):.1f} s), one worker {one_worker:.1f} s "
          f"(training {float(np.load(tmp_path / 'single.npz')['seconds']):.1f} s)")


@pytest.mark.e2e
def test_two_workers_on_loopback_train_a_sharded_bank_as_one_device(tmp_path):
    """--bank-layout sharded on two MultiWorkerMirroredStrategy processes on
    127.0.0.1 and on one device, the same four precomputed global batches
    (split by halves across the workers, an index on both halves): each
    worker holds ceil(N / 2) + 1 rows (N odd here), worker r the rows
    r, r + 2, ...; the logical buffer both assemble (a collective) is the
    single device's, visits included, and so are the losses; each worker's
    `.keras` file (saving assembles the shards too) loads on one device."""
    script = os.path.join(HERE, "multi_worker.py")
    flags = ["--steps", "4", "--fixed-batches", "--bank-layout", "sharded"]
    outs = [tmp_path / f"worker{i}.npz" for i in range(2)]
    run_two_workers(lambda i: [script, outs[i], *flags])
    check(run_helper("multi_worker.py", [tmp_path / "single.npz", *flags], timeout=240))
    first, second, single = (np.load(out) for out in (*outs, tmp_path / "single.npz"))
    assert (int(first["replicas"]), int(single["replicas"])) == (2, 1)
    bank = single["bank"]
    assert single["shard"].shape == bank.shape and len(bank) % 2 == 1
    assert first["shard"].shape == second["shard"].shape == (len(bank) // 2 + 2, bank.shape[1])
    for worker in (first, second):
        np.testing.assert_array_equal(worker["visits"], single["visits"])
        np.testing.assert_array_equal(worker["bank"], first["bank"])
    np.testing.assert_array_equal(first["shard"][:-1], first["bank"][0::2])
    np.testing.assert_array_equal(second["shard"][:-2], first["bank"][1::2])
    np.testing.assert_allclose(first["bank"], bank, atol=1e-4)
    assert np.abs(bank).sum() > 0 and single["visits"].sum() > 0
    np.testing.assert_allclose(first["losses"], single["losses"], atol=1e-4)
    assert len(single["losses"]) == 4
    # Each worker's model.keras holds the logical buffer, which loads on one device.
    loaded = keras.models.load_model(tmp_path / "worker1.keras", safe_mode=True).perturbation
    assert loaded.bank.shape == bank.shape
    np.testing.assert_array_equal(loaded.bank_rows(), first["bank"])
    np.testing.assert_array_equal(loaded.visit_counts(), single["visits"])


@pytest.mark.e2e
def test_train_py_on_two_workers_writes_one_run_directory(tmp_path):
    """train.py on each worker with the same --run-dir (shared storage): the
    chief (worker 0) writes the run directory, worker 1 its own worker_1/
    inside it; neither refuses the other's files or writes over them."""
    run_dir = tmp_path / "run"
    run_two_workers(lambda i: [
        "train.py", "--strategy", "multi_worker", "--sync-bn", "--kernel-impl", "tf",
        "--backbone", "tiny_convnet", "--width", "4", "--proj-dim", "16",
        "--pred-hidden", "8", "--batch-size", "32", "--epochs", "2", "--knn-every", "0",
        "--linear-epochs", "2", "--run-dir", run_dir])
    for directory in (run_dir, run_dir / "worker_1"):
        report = json.loads((directory / "report.json").read_text())
        assert report["config"]["run_dir"] == str(directory)
        assert (directory / "model.keras").exists()
        assert len((directory / "history.csv").read_text().splitlines()) == 3
    assert not (run_dir / "worker_0").exists()


@pytest.mark.parametrize("cluster, task, subdir", [
    (None, None, ""),
    ({"worker": ["a:1", "b:2"]}, {"type": "worker", "index": 0}, ""),
    ({"worker": ["a:1", "b:2"]}, {"type": "worker", "index": 1}, "worker_1"),
    ({"chief": ["c:0"], "worker": ["a:1"]}, {"type": "chief", "index": 0}, ""),
    ({"chief": ["c:0"], "worker": ["a:1"]}, {"type": "worker", "index": 0}, "worker_0"),
])
def test_only_the_chief_writes_the_run_directory_itself(monkeypatch, cluster, task, subdir):
    if cluster is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
    assert distribute.worker_subdir() == subdir


def test_tf_config_that_is_not_json_is_named(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{'cluster': ")
    with pytest.raises(ConfigError, match="TF_CONFIG is not JSON .*--strategy multi_worker"):
        distribute.worker_subdir()
