"""Pictures of a run, as PNG files for report.md: the training curves, pairs
of augmented views (also sent to TensorBoard), and a 2-D map of the
embeddings coloured by label. matplotlib draws off-screen (Agg), so they
work on headless machines."""

import csv
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from simclic_tf.callbacks import COLLAPSED_RANK  # noqa: E402
from simclic_tf.faults import atomic_path  # noqa: E402

# history.csv columns worth a panel, with their titles.
CURVES = (("loss", "SimCLIC loss"), ("z_std", "z_std (collapse at 0)"),
          ("z_rank", f"z_rank (collapse below {COLLAPSED_RANK})"),
          ("knn_accuracy", "kNN accuracy"), ("online_probe_accuracy", "online probe accuracy"))


def training_curves(history_csv, path):
    """One panel per logged quantity of `history_csv` against the epoch."""
    with open(history_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    panels = [(key, title) for key, title in CURVES if rows and key in rows[0]]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for axis, (key, title) in zip(axes[0], panels):
        points = [(int(row["epoch"]) + 1, float(row[key])) for row in rows
                  if row[key] not in ("", "NA")]
        axis.plot(*zip(*points), marker="o" if len(points) < 30 else None)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.ticklabel_format(axis="y", useOffset=False)
    figure.tight_layout()
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=100)
    plt.close(figure)


def view_pairs(images, augment, count=8, seed=0):
    """A grid image (float32 HxWxC in [0, 1]): each row an original and two
    augmented views of it, for `count` images drawn with `seed`."""
    rng = np.random.default_rng(seed)
    chosen = images[rng.choice(len(images), min(count, len(images)), replace=False)]
    batch = tf.cast(chosen, tf.float32) / 255.0
    columns = [batch, augment(batch), augment(batch)]
    rows = tf.concat(columns, axis=2)  # side by side
    return tf.reshape(rows, (-1,) + tuple(rows.shape[2:])).numpy()  # stacked


def save_image(grid, path, scale=4):
    """Writes a float [0, 1] image, each pixel enlarged to `scale` x `scale`."""
    grid = np.repeat(np.repeat(np.clip(grid, 0.0, 1.0), scale, 0), scale, 1)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    with atomic_path(path) as partial:
        plt.imsave(partial, grid, cmap="gray" if grid.ndim == 2 else None)


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
