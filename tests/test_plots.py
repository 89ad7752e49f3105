"""The report's pictures."""

import matplotlib.image
import numpy as np

from simclic_tf import augment, plots


def test_view_pairs_put_each_image_beside_two_views():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    grid = plots.view_pairs(images, augment.build_augmentation(8, 3, seed=0), count=5)
    assert grid.shape == (5 * 8, 3 * 8, 3)
    originals = grid[:, :8].reshape(5, 8, 8, 3)
    chosen = np.random.default_rng(0).choice(20, 5, replace=False)
    np.testing.assert_allclose(originals, images[chosen] / 255.0, atol=1e-6)
    assert not np.allclose(grid[:, 8:16], grid[:, 16:])  # two different draws


def test_curves_and_embedding_map_are_drawn(tmp_path):
    history = tmp_path / "history.csv"
    history.write_text("epoch,knn_accuracy,loss,z_std\n0,0.3,-0.5,0.02\n1,NA,-0.7,0.02\n"
                       "2,0.4,-0.8,0.021\n")
    plots.training_curves(history, tmp_path / "curves.png")
    curves = matplotlib.image.imread(tmp_path / "curves.png")
    assert curves.shape[1] > 2 * curves.shape[0]  # three panels side by side

    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 16)) + np.repeat(np.eye(16)[:3] * 5, 100, axis=0)
    plots.embedding_map(features, np.repeat([0, 1, 2], 100), ["a", "b", "c"],
                        tmp_path / "embeddings.png")
    picture = matplotlib.image.imread(tmp_path / "embeddings.png")
    assert picture.shape[:2] == (500, 600)
    assert picture[..., :3].std() > 0.05  # not blank
