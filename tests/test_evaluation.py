import numpy as np
import pytest
from sklearn.datasets import load_digits

from simclic_tf.evaluation import knn_accuracy, knn_predict, linear_accuracy

SHARED_DATA = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


def knn_reference(train, labels, queries, num_classes, k, temperature):
    """The weighted kNN written one query at a time."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    predictions = []
    for query in queries:
        similarity = train @ (query / np.linalg.norm(query))
        nearest = np.argsort(-similarity)[:k]
        votes = np.zeros(num_classes)
        np.add.at(votes, labels[nearest], np.exp(similarity[nearest] / temperature))
        predictions.append(votes.argmax())
    return np.array(predictions)


@pytest.mark.parametrize("k, temperature", [(1, 0.1), (5, 0.1), (20, 0.5)])
def test_knn_matches_the_per_query_reference(k, temperature):
    rng = np.random.default_rng(k)
    train, queries = rng.normal(size=(300, 16)), rng.normal(size=(50, 16))
    labels = rng.integers(0, 4, 300)
    predicted = knn_predict(train, labels, queries, 4, k=k, temperature=temperature,
                            batch_size=16)  # several query batches
    np.testing.assert_array_equal(predicted, knn_reference(train, labels, queries, 4, k,
                                                           temperature))


def test_knn_with_k_above_the_memory_size_uses_all_of_it():
    train = np.eye(3)
    assert knn_predict(train, np.array([0, 1, 1]), np.array([[1.0, 0.1, 0.1]]), 2, k=200,
                       temperature=10.0).tolist() == [1]  # two weak votes beat one strong


def test_knn_and_linear_beat_chance_on_real_images():
    path = SHARED_DATA / "cifar10_test.npz"
    if not path.exists():
        pytest.skip(f"{path} not found: the shared data folder must sit beside the repo")
    data = np.load(path)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data["y"]))[:3000]
    pixels = data["x"][order].reshape(3000, -1).astype("float32") / 255
    pixels -= pixels.mean(axis=1, keepdims=True)  # raw pixels, centred per image
    labels = data["y"][order]
    accuracy = knn_accuracy(pixels[:2000], labels[:2000], pixels[2000:], labels[2000:], 10)
    assert accuracy > 0.2  # chance is 0.1; raw-pixel kNN on CIFAR-10 is near 0.3


def test_linear_evaluation_on_digits_pixels():
    digits = load_digits()
    x, y = digits.data.astype("float32"), digits.target
    accuracy = linear_accuracy(x[:1200], y[:1200], x[1200:], y[1200:], 10, epochs=30)
    assert accuracy > 0.85  # chance is 0.1; a converged logistic regression gets 0.92
