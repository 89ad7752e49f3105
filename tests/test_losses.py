import math

import numpy as np
import pytest

from simclic_tf.losses import cross_entropy, negative_cosine


@pytest.mark.parametrize("p, t, expected", [
    ([[1.0, 0.0]], [[1.0, 0.0]], -1.0),
    ([[1.0, 0.0]], [[0.0, 3.0]], 0.0),
    ([[2.0, 2.0]], [[5.0, 0.0]], -1 / math.sqrt(2)),
    ([[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, 1.0]], 0.0),  # batch mean of +1 and -1
])
def test_negative_cosine_hand_computed(p, t, expected):
    assert float(negative_cosine(np.array(p), np.array(t))) == pytest.approx(expected, abs=1e-6)


def test_negative_cosine_is_scale_free():
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    assert float(negative_cosine(p, t)) == pytest.approx(float(negative_cosine(7 * p, 0.1 * t)),
                                                         abs=1e-6)


def test_cross_entropy_hand_computed():
    # Uniform target over two classes against uniform prediction: log 2.
    assert float(cross_entropy(np.zeros((1, 2)), np.zeros((1, 2)))) == pytest.approx(math.log(2))
    # Target softmax (0.25, 0.75) against prediction softmax (0.5, 0.5): still log 2.
    t = np.log([[1.0, 3.0]])
    assert float(cross_entropy(np.zeros((1, 2)), t)) == pytest.approx(math.log(2))
    # Prediction softmax (0.25, 0.75) against target (0.25, 0.75): the entropy.
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert float(cross_entropy(t, t)) == pytest.approx(entropy, abs=1e-6)
