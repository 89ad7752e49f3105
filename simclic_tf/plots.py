"""Pictures of a run, as PNG files for report.md: the training curves, pairs
of augmented views (also sent to TensorBoard), and a 2-D map of the
embeddings coloured by label. matplotlib draws off-screen (Agg), so they
work on headless machines."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from simclic_tf.callbacks import COLLAPSED_RANK, CollapseMonitor  # noqa: E402
from simclic_tf.faults import atomic_path  # noqa: E402

# history.csv columns worth a panel, with their titles.
CURVES = (("loss", "SimCLIC loss"), ("z_std", "z_std (collapse at 0)"),
          ("z_rank", f"z_rank (collapse below {COLLAPSED_RANK})"),
          ("knn_accuracy", "kNN accuracy"), ("online_probe_accuracy", "online probe accuracy"))

# The shortest side, in pixels, of an image in the view grid.
MIN_TILE = 64


def reference_lines(proj_dim, random_init):
    """{panel: [(y, label, colour)]}: the healthy z_std 1/sqrt(proj_dim), the
    collapse alarm's thresholds (CollapseMonitor's), and the kNN accuracy of
    the encoder at random initialisation (`random_init`, report.json's)."""
    alarm = CollapseMonitor(proj_dim)
    healthy = proj_dim ** -0.5
    lines = {
        "z_std": [(healthy, f"healthy 1/sqrt({proj_dim}) = {healthy:.4f}", "tab:green"),
                  (alarm.std_threshold, f"collapse alarm below {alarm.std_threshold:.4f}",
                   "tab:red")],
        "z_rank": [(alarm.rank_threshold, f"collapse alarm below {alarm.rank_threshold:g}",
                    "tab:red")],
    }
    if "knn_accuracy" in random_init:
        level = random_init["knn_accuracy"]
        lines["knn_accuracy"] = [(level, f"random init {level:.3f}", "tab:gray")]
    return lines


def curves_figure(rows, proj_dim, random_init):
    """One panel per logged quantity of `rows` (history.csv's, {column:
    float}, NA left out) against the epoch, with the `reference_lines`. z_std's
    axis spans 0 to max(1.25 x healthy, 1.05 x its highest value) and z_rank's
    0 to 1, so that a healthy run's 1e-6 wiggles stay flat, not a cliff."""
    panels = [(key, title) for key, title in CURVES if any(key in row for row in rows)]
    references = reference_lines(proj_dim, random_init)
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for axis, (key, title) in zip(axes[0], panels):
        epochs, values = zip(*[(int(row["epoch"]) + 1, row[key]) for row in rows if key in row])
        axis.plot(epochs, values, marker="o" if len(values) < 30 else None)
        for level, label, colour in references.get(key, ()):
            axis.axhline(level, color=colour, linestyle="--", linewidth=1, label=label)
        if key == "z_std":
            axis.set_ylim(0, max(1.25 * proj_dim ** -0.5, 1.05 * max(values)))
        elif key == "z_rank":
            axis.set_ylim(0, 1)
        if key in references:
            axis.legend(fontsize=7, loc="best")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.ticklabel_format(axis="y", useOffset=False)
    figure.tight_layout()
    return figure


def training_curves(rows, path, proj_dim, random_init):
    """Writes `curves_figure` to `path`."""
    figure = curves_figure(rows, proj_dim, random_init)
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=100)
    plt.close(figure)


def tile_scale(height, width, min_side=MIN_TILE):
    """The integer factor that makes an image's shorter side at least
    `min_side` pixels: ceil(min_side / shorter side), 1 for images that large."""
    return max(1, math.ceil(min_side / min(height, width)))


def view_pairs(images, augment, count=8, seed=0):
    """A grid image (float32 HxWxC in [0, 1]): each row an original and two
    augmented views of it, for `count` images drawn with `seed`. Images are
    enlarged by `tile_scale` (nearest neighbour), so each tile is at least
    MIN_TILE pixels on a side (8x8 digits 8 times, 32x32 CIFAR twice) and
    images of 64 pixels or more are left as they are."""
    rng = np.random.default_rng(seed)
    chosen = images[rng.choice(len(images), min(count, len(images)), replace=False)]
    batch = tf.cast(chosen, tf.float32) / 255.0
    columns = [batch, augment(batch), augment(batch)]
    rows = tf.concat(columns, axis=2)  # side by side
    grid = tf.reshape(rows, (-1,) + tuple(rows.shape[2:])).numpy()  # stacked
    scale = tile_scale(*images.shape[1:3])
    return np.repeat(np.repeat(grid, scale, 0), scale, 1)


def save_image(grid, path):
    """Writes a float [0, 1] image, pixel for pixel."""
    grid = np.clip(grid, 0.0, 1.0)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    with atomic_path(path) as partial:
        plt.imsave(partial, grid, cmap="gray" if grid.ndim == 2 else None, vmin=0.0, vmax=1.0)


def embedding_map(features, labels, class_names, path, max_points=2000, seed=0):
    """Features projected on their first two principal components, one colour
    per class (PCA rather than t-SNE: deterministic and fast on a CPU)."""
    rng = np.random.default_rng(seed)
    keep = rng.permutation(len(features))[:max_points]
    points = PCA(2, random_state=seed).fit_transform(features[keep])
    labels = np.asarray(labels)[keep]
    figure, axis = plt.subplots(figsize=(6, 5))
    colours = plt.get_cmap("tab20" if len(class_names) > 10 else "tab10")
    for label in np.unique(labels):
        mask = labels == label
        name = class_names[label] if label < len(class_names) else str(label)
        axis.scatter(points[mask, 0], points[mask, 1], s=6, color=colours(label % colours.N),
                     label=name)
    if len(class_names) <= 20:
        axis.legend(markerscale=3, fontsize=7, ncol=math.ceil(len(class_names) / 10),
                    loc="best")
    axis.set_title("encoder features, PCA")
    figure.tight_layout()
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=100)
    plt.close(figure)
