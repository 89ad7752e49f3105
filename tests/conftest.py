import keras
import pytest

from simclic_tf import file_sources


@pytest.fixture(autouse=True)
def float32_policy_after_each_test():
    """A run sets Keras's global dtype policy (`--precision auto` picks
    mixed_bfloat16 on CPUs with native bfloat16); later tests that build
    layers directly expect float32, whatever ran before them."""
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def mock_tfds(monkeypatch):
    """`tfds.testing.mock_data`, with the network check before a download
    answered "reachable": a mocked dataset is never prepared, so the real
    check would fail on an offline machine although nothing is downloaded."""
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(file_sources, "unreachable", lambda address: None)
    return tfds.testing.mock_data
