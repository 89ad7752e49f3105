"""The history bank's two layouts (simclic_tf/history_bank.py), through its
public interface: on one device, and replicated against sharded on two
logical CPU devices (in a subprocess, tests/bank_layouts.py: logical devices
must be configured before TensorFlow initialises them)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from simclic_tf import history_bank, kernels
from simclic_tf.kernels.reference import history_exchange_reference

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("layout", ["auto", "replicated", "sharded"])
def test_one_replica_holds_every_row_and_saves_them_under_their_names(layout):
    bank = history_bank.create(layout, 10, 4, "bfloat16")
    assert isinstance(bank, history_bank.ReplicatedBank)
    assert [w.path for w in bank.weights] == ["bank", "visits"]
    indices = tf.constant([3, 7, 3])
    rows = np.arange(12, dtype="float32").reshape(3, 4)
    old, seen = bank.exchange(kernels.history_exchange, indices, rows, 0.0)
    assert not np.asarray(seen).any() and not np.asarray(old).any()
    read_rows, read_seen = bank.read(indices)
    # Row 3 holds the mean of its two positions' rows (exact in bfloat16 here).
    np.testing.assert_array_equal(np.asarray(read_rows), (rows[[0, 1, 0]] + rows[[2, 1, 2]]) / 2)
    assert np.asarray(read_seen).all()
    store = {}
    bank.save_own_variables(store)
    assert sorted(store) == ["bank", "visits"] and str(store["bank"].dtype) == "bfloat16"
    fresh = history_bank.create(layout, 10, 4, "bfloat16")
    fresh.load_own_variables(store)
    np.testing.assert_array_equal(fresh.rows(), bank.rows())
    np.testing.assert_array_equal(fresh.visit_counts(), np.isin(np.arange(10), [3, 7]))


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    out = tmp_path_factory.mktemp("banks") / "banks.npz"
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "bank_layouts.py"), out],
        cwd=os.path.dirname(HERE), env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return dict(np.load(out))


def test_replicated_and_sharded_banks_exchange_and_save_the_same_rows(two_replicas):
    """Two replicas, the same steps (an index on both replicas, one twice on
    one replica, momentum 0.5): both layouts return the same old rows and
    `seen` as a numpy reference on the global batch, bit for bit, read the
    same rows back, and save the same logical state, which loads into the
    other layout unchanged."""
    result, num_rows = two_replicas, int(two_replicas["num_rows"])
    assert (str(result["replicated_kind"]), str(result["sharded_kind"])) == (
        "ReplicatedBank", "ShardedBank")
    # Replica r holds ceil(N / 2) rows and the scratch row.
    assert result["replicated_shape"].tolist() == [num_rows, 4]
    assert result["sharded_shape"].tolist() == [-(-num_rows // 2) + 1, 4]
    bank, visits = np.zeros((num_rows, 4), "float32"), np.zeros(num_rows, "int32")
    for step, indices in enumerate(result["steps"]):
        old_rows, seen, bank, visits = history_exchange_reference(
            bank, visits, indices, result[f"replicated_new_rows{step}"], result["momentum"])
        for layout in ("replicated", "sharded"):
            np.testing.assert_allclose(result[f"{layout}_old_rows{step}"], old_rows, rtol=1e-6)
            np.testing.assert_array_equal(result[f"{layout}_seen{step}"], seen)
        for name in (f"old_rows{step}", f"seen{step}"):
            np.testing.assert_array_equal(result[f"replicated_{name}"], result[f"sharded_{name}"])
    np.testing.assert_allclose(result["replicated_saved_bank"], bank, rtol=1e-6)
    np.testing.assert_array_equal(result["replicated_saved_visits"], visits)
    for name in ("read_rows", "read_seen", "saved_bank", "saved_visits"):
        np.testing.assert_array_equal(result[f"replicated_{name}"], result[f"sharded_{name}"])
    np.testing.assert_array_equal(result["replicated_read_rows"], bank[result["read"]])
    for layout, other in (("replicated", "sharded"), ("sharded", "replicated")):
        np.testing.assert_array_equal(result[f"{layout}_in_{other}_bank"],
                                      result[f"{layout}_saved_bank"])
        np.testing.assert_array_equal(result[f"{layout}_in_{other}_visits"],
                                      result[f"{layout}_saved_visits"])
