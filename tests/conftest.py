import pytest

from simclic_tf import file_sources


@pytest.fixture
def mock_tfds(monkeypatch):
    """`tfds.testing.mock_data`, with the network check before a download
    answered "reachable": a mocked dataset is never prepared, so the real
    check would fail on an offline machine although nothing is downloaded."""
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(file_sources, "unreachable", lambda address: None)
    return tfds.testing.mock_data
