"""The report's pictures."""

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest

from simclic_tf import augment, plots


def test_view_pairs_put_each_image_beside_two_views():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    grid = plots.view_pairs(images, augment.build_augmentation(8, 3, seed=0), count=5)
    assert grid.shape == (5 * 64, 3 * 64, 3)  # 8x8 images enlarged 8 times
    native = grid[::8, ::8]
    np.testing.assert_array_equal(grid, np.repeat(np.repeat(native, 8, 0), 8, 1))  # nearest
    originals = native[:, :8].reshape(5, 8, 8, 3)
    chosen = np.random.default_rng(0).choice(20, 5, replace=False)
    np.testing.assert_allclose(originals, images[chosen] / 255.0, atol=1e-6)
    assert not np.allclose(native[:, 8:16], native[:, 16:])  # two different draws


@pytest.mark.parametrize("size, scale", [((8, 8), 8), ((20, 30), 4), ((32, 32), 2),
                                         ((64, 64), 1), ((96, 80), 1)])
def test_the_stored_view_grid_has_tiles_of_64_pixels_or_more(tmp_path, size, scale):
    images = np.random.default_rng(0).integers(0, 256, (10, *size, 1), dtype=np.uint8)
    grid = plots.view_pairs(images, augment.build_augmentation(size, 1, seed=0), count=4)
    plots.save_image(grid, tmp_path / "views.png")
    stored = matplotlib.image.imread(tmp_path / "views.png")
    assert stored.shape[:2] == (4 * size[0] * scale, 3 * size[1] * scale)
    assert min(size) * scale >= plots.MIN_TILE


def test_a_grey_grid_is_stored_with_its_own_levels(tmp_path):
    grid = np.full((4, 6, 1), 0.5, "float32")
    grid[0, 0] = 0.25
    plots.save_image(grid, tmp_path / "grey.png")
    stored = matplotlib.image.imread(tmp_path / "grey.png")[..., 0]
    np.testing.assert_allclose([stored[0, 0], stored[1, 1]], [0.25, 0.5], atol=1 / 255)


def history(z_std, z_rank=0.6):
    """Three epochs of history rows, kNN measured in the first and the last."""
    return [{"epoch": 0.0, "loss": -0.5, "z_std": z_std[0], "z_rank": z_rank,
             "knn_accuracy": 0.3},
            {"epoch": 1.0, "loss": -0.7, "z_std": z_std[1], "z_rank": z_rank},
            {"epoch": 2.0, "loss": -0.8, "z_std": z_std[2], "z_rank": z_rank,
             "knn_accuracy": 0.4}]


def panels(figure):
    return {axis.get_title().split(" ")[0]: axis for axis in figure.axes}


def references(axis):
    """{label: y} of the panel's horizontal reference lines."""
    return {line.get_label(): line.get_ydata()[0] for line in axis.get_lines()
            if not line.get_label().startswith("_")}


def test_curves_put_z_std_and_z_rank_on_axes_from_0_with_the_collapse_alarm():
    healthy = 32 ** -0.5
    wiggles = [healthy, healthy + 1e-6, healthy - 1e-6]
    figure = plots.curves_figure(history(wiggles), 32, {"knn_accuracy": 0.25})
    axes = panels(figure)
    assert list(axes) == ["SimCLIC", "z_std", "z_rank", "kNN"]
    assert axes["z_std"].get_ylim() == pytest.approx((0.0, 1.25 * healthy))
    assert references(axes["z_std"]) == pytest.approx({
        "healthy 1/sqrt(32) = 0.1768": healthy, "collapse alarm below 0.0177": 0.1 * healthy})
    assert axes["z_rank"].get_ylim() == (0.0, 1.0)
    assert references(axes["z_rank"]) == {"collapse alarm below 0.25": 0.25}
    assert references(axes["kNN"]) == {"random init 0.250": 0.25}
    assert references(axes["SimCLIC"]) == {}
    plt.close(figure)


def test_the_z_std_axis_grows_to_hold_values_above_the_healthy_level():
    figure = plots.curves_figure(history([0.3, 0.5, 0.4]), 32, {"knn_accuracy": 0.25})
    assert panels(figure)["z_std"].get_ylim() == pytest.approx((0.0, 1.05 * 0.5))
    plt.close(figure)


def test_curves_and_embedding_map_are_drawn(tmp_path):
    plots.training_curves(history([0.02, 0.02, 0.021]), tmp_path / "curves.png", 512,
                          {"knn_accuracy": 0.25})
    curves = matplotlib.image.imread(tmp_path / "curves.png")
    assert curves.shape[:2] == (320, 1600)  # four panels side by side

    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 16)) + np.repeat(np.eye(16)[:3] * 5, 100, axis=0)
    plots.embedding_map(features, np.repeat([0, 1, 2], 100), ["a", "b", "c"],
                        tmp_path / "embeddings.png")
    picture = matplotlib.image.imread(tmp_path / "embeddings.png")
    assert picture.shape[:2] == (500, 600)
    assert picture[..., :3].std() > 0.05  # not blank
