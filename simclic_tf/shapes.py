"""The `shapes` dataset's images: ten classes of shapes drawn by NumPy, the
same images for a seed on every machine (no file, no download)."""

import numpy as np

CLASS_NAMES = ("disc", "square", "triangle", "ring", "plus", "diamond", "bar", "star",
               "half-disc", "frame")


def shape_masks(u, v):
    """Whether each point (u, v), in the shape's own frame scaled to its radius,
    lies inside each of the ten shapes, in `CLASS_NAMES` order."""
    r, box = np.hypot(u, v), np.maximum(abs(u), abs(v))
    return [r < 1, box < 0.8, (v > -0.5) & (abs(u) < (1 - v) * 0.577),
            (r > 0.55) & (r < 1), ((abs(u) < 0.3) | (abs(v) < 0.3)) & (box < 1),
            abs(u) + abs(v) < 1, (abs(u) < 1) & (abs(v) < 0.35),
            r < 0.6 + 0.4 * np.cos(5 * np.arctan2(v, u)), (r < 1) & (v > 0),
            (box < 0.85) & (box > 0.5)]


def draw_shapes(count, height, width, seed):
    """(uint8 images (count, height, width, 3), int64 labels), classes balanced.
    Shapes are rendered at twice the size and averaged down, for soft edges."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % len(CLASS_NAMES))
    side = min(height, width)

    def draw(*shape, low=0.0, high=1.0):
        return rng.uniform(low, high, (count,) + shape)

    centre = draw(2, 1, 1, low=0.3, high=0.7) * np.array([width, height])[:, None, None]
    radius = draw(1, 1, low=0.2, high=0.4) * side
    angle = draw(1, 1, low=-0.3, high=0.3)
    ys, xs = np.meshgrid((np.arange(2 * height) + 0.5) / 2, (np.arange(2 * width) + 0.5) / 2,
                         indexing="ij")
    dx, dy = xs - centre[:, 0], ys - centre[:, 1]
    u = (np.cos(angle) * dx + np.sin(angle) * dy) / radius
    v = (np.cos(angle) * dy - np.sin(angle) * dx) / radius
    inside = np.zeros(u.shape, np.float32)
    for label, mask in enumerate(shape_masks(u, v)):
        rows = labels == label
        inside[rows] = mask[rows]
    coverage = inside.reshape(count, height, 2, width, 2).mean(axis=(2, 4))[..., None]
    # A light shape on a dark, shaded background, both tinted alike: brightness,
    # contrast and tint vary within the colour jitter's range, so that colour
    # tells one image from another no better than the augmentation allows.
    tint = draw(1, 1, 3, low=0.8, high=1.2)
    foreground = draw(1, 1, 1, low=0.6, high=0.95) * tint
    background = draw(1, 1, 1, low=0.05, high=0.4) * tint
    direction = draw(1, 1, high=2 * np.pi)
    ramp = (np.cos(direction) * (xs[::2, ::2] / width - 0.5)
            + np.sin(direction) * (ys[::2, ::2] / height - 0.5))
    background = background * (1 + draw(1, 1, high=0.8) * ramp)[..., None]
    pixels = coverage * foreground + (1 - coverage) * background
    pixels += rng.normal(0, 0.05, pixels.shape)
    return (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.int64)
