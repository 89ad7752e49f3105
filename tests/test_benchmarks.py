"""The benchmark's validation set: held-out CIFAR-10 training images, never
the pretraining images and never the test file."""

import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def accuracy_at_budget():
    if not (SHARED_DATA / "cifar10_train_jpeg.tar.gz").exists():
        pytest.skip(f"{SHARED_DATA} not found: the shared data folder must sit beside the repo")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import accuracy_at_budget
    finally:
        sys.path.remove(str(BENCHMARKS))
    return accuracy_at_budget


def test_validation_set_is_balanced_and_disjoint_from_pretraining(accuracy_at_budget, tmp_path):
    path = tmp_path / "validation.npz"
    accuracy_at_budget.write_validation_set(SHARED_DATA, path, per_class=3)
    validation = np.load(path)
    pretraining = np.load(SHARED_DATA / "cifar10_train_10k.npz")
    assert validation["x"].shape == (30, 32, 32, 3) and validation["x"].dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(validation["y"]), [3] * 10)
    assert list(validation["class_names"]) == list(pretraining["class_names"])
    assert not set(validation["source_paths"]) & set(pretraining["source_paths"])
    flat = pretraining["x"].reshape(len(pretraining["x"]), -1)
    for image in validation["x"].reshape(30, -1):
        assert np.abs(flat.astype(np.int16) - image).sum(axis=1).min() > 0
    # Each label is its folder's class, as in the 10k file.
    for label, source in zip(validation["y"], validation["source_paths"]):
        assert source.split("/")[1] == pretraining["class_names"][label]
