"""Procedural geometric shapes: the renderer behind the embedded ``shapes`` dataset.

Each shape is an implicit region in canonical coordinates (radius about 1). A scene places shapes
with a random centre, scale and rotation, bends space with a smooth random (elastic) displacement
field, and evaluates the regions on a supersampled pixel grid, which gives anti-aliased images and
exact instance masks from the same geometry. Backgrounds are colour gradients with noise and
clutter (thin lines, small blobs). Everything is a pure function of a NumPy ``Generator``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "hexagon", "star", "cross", "ring", "crescent")
SUPERSAMPLE = 4


def _regular_polygon(sides: int, rotation: float = 0.0) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    normals = 2 * np.pi * (np.arange(sides) + 0.5) / sides + rotation
    apothem = np.cos(np.pi / sides)

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        reach = np.max(u[..., None] * np.cos(normals) + v[..., None] * np.sin(normals), axis=-1)
        return reach <= apothem

    return inside


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    angle = np.arctan2(v, u)
    phase = np.abs(((angle * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at a tip, 0 between tips
    return np.hypot(u, v) <= 0.42 + 0.58 * phase**1.5


SHAPE_REGIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "triangle": _regular_polygon(3, rotation=np.pi / 2),
    "hexagon": _regular_polygon(6),
    "star": _star,
    "cross": lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95)),
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.55**2),
    "crescent": lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v >= 0.8**2),
}


@dataclass(frozen=True)
class Scene:
    """A rendered scene: ``image`` (H, W, 3) uint8, per-instance boolean ``masks`` and class ids."""

    image: np.ndarray
    masks: list[np.ndarray]
    labels: list[int]


def _elastic_field(rng: np.ndarray | np.random.Generator, size: int, strength: float):
    """A smooth displacement field (sum of a few random low-frequency waves), in pixels."""
    waves = []
    for _ in range(3):
        freq = rng.uniform(0.5, 2.0) * 2 * np.pi / size
        direction = rng.uniform(0, 2 * np.pi)
        phase = rng.uniform(0, 2 * np.pi)
        amp = rng.normal(0, strength, size=2)
        waves.append((freq * np.cos(direction), freq * np.sin(direction), phase, amp))

    def displace(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Displacement (dy, dx) at pixel coordinates (y, x)."""
        dy = np.zeros_like(y)
        dx = np.zeros_like(x)
        for fy, fx, phase, amp in waves:
            s = np.sin(fy * y + fx * x + phase)
            dy += amp[0] * s
            dx += amp[1] * s
        return dy, dx

    displace.reach = float(sum(np.abs(amp).max() for *_, amp in waves))  # largest possible displacement
    return displace


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _contrasting_color(rng: np.random.Generator, background: np.ndarray, min_distance: float = 110.0) -> np.ndarray:
    for _ in range(50):
        color = _random_color(rng)
        if np.linalg.norm(color - background) >= min_distance:
            return color
    return 255.0 - background


def _background(rng: np.random.Generator, size: int, grid_y: np.ndarray, grid_x: np.ndarray) -> np.ndarray:
    start, end = _random_color(rng), _random_color(rng)
    angle = rng.uniform(0, 2 * np.pi)
    t = ((grid_y * np.sin(angle) + grid_x * np.cos(angle)) / size + 1) / 2
    t = np.clip(t, 0, 1)[..., None]
    image = start * (1 - t) + end * t
    # Clutter: thin random lines and small blobs that are not shapes of any class.
    for _ in range(rng.integers(0, 3)):
        p0, p1 = rng.uniform(0, size, 2), rng.uniform(0, size, 2)
        direction = p1 - p0
        length = np.linalg.norm(direction) + 1e-6
        normal = np.array([-direction[1], direction[0]]) / length
        along = ((grid_y - p0[0]) * direction[0] + (grid_x - p0[1]) * direction[1]) / length
        across = np.abs((grid_y - p0[0]) * normal[0] + (grid_x - p0[1]) * normal[1])
        line = (across <= size * 0.012) & (along >= 0) & (along <= length)
        image[line] = _random_color(rng)
    for _ in range(rng.integers(0, 4)):
        centre = rng.uniform(0, size, 2)
        radius = rng.uniform(0.02, 0.05) * size
        blob = (grid_y - centre[0]) ** 2 + (grid_x - centre[1]) ** 2 <= radius**2
        image[blob] = _random_color(rng)
    return image


def render_scene(
    rng: np.random.Generator,
    size: int,
    num_shapes: int = 1,
    scale_range: tuple[float, float] = (0.26, 0.44),
    elastic: float = 0.025,
    noise: float = 8.0,
    classes: tuple[int, ...] | None = None,
) -> Scene:
    """Render ``num_shapes`` random shapes on a cluttered background.

    ``scale_range`` is the shape radius as a fraction of ``size``; ``elastic`` the displacement
    amplitude as a fraction of ``size``; ``classes`` the indices into ``SHAPE_CLASSES`` to draw
    from (all by default); labels are positions in ``classes``. Later shapes occlude earlier
    ones; the returned masks are the visible (occlusion-resolved) pixels, disjoint.
    """
    fine = size * SUPERSAMPLE
    coords = (np.arange(fine) + 0.5) / SUPERSAMPLE
    grid_y, grid_x = np.meshgrid(coords, coords, indexing="ij")
    image = _background(rng, size, grid_y, grid_x)
    background_mean = image.reshape(-1, 3).mean(axis=0)
    owner = np.full((fine, fine), -1, dtype=np.int64)
    labels: list[int] = []
    for index in range(num_shapes):
        pool = classes if classes is not None else tuple(range(len(SHAPE_CLASSES)))
        label = int(rng.integers(len(pool)))
        radius = rng.uniform(*scale_range) * size
        margin = radius * 0.7
        centre = rng.uniform(margin, size - margin, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        displace = _elastic_field(rng, size, elastic * size)
        # Evaluate only the shape's bounding box: canonical shapes lie within radius 1.13 (the
        # square's corners), plus the largest displacement the warp can produce.
        reach = radius * 1.15 + displace.reach + 1
        lo = np.clip(((centre - reach) * SUPERSAMPLE).astype(int), 0, fine)
        hi = np.clip(((centre + reach) * SUPERSAMPLE).astype(int) + 1, 0, fine)
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
        by, bx = grid_y[box], grid_x[box]
        dy, dx = displace(by, bx)
        y, x = by + dy - centre[0], bx + dx - centre[1]
        cos, sin = np.cos(angle), np.sin(angle)
        u, v = (cos * x + sin * y) / radius, (-sin * x + cos * y) / radius
        region = SHAPE_REGIONS[SHAPE_CLASSES[pool[label]]](u, v)
        color = _contrasting_color(rng, background_mean)
        shade = 1.0 + 0.15 * (u * rng.normal() + v * rng.normal())[..., None]  # mild shading
        image[box] = np.where(region[..., None], np.clip(color * shade, 0, 255), image[box])
        owner[box][region] = index
        labels.append(label)
    image = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    image = image + rng.normal(0, noise, size=image.shape)
    # Each pixel goes to whoever covers most of its supersamples (background included), so masks
    # are disjoint even where two shapes each cover exactly half a pixel.
    votes = np.stack([(owner == index) for index in range(-1, num_shapes)])
    votes = votes.reshape(num_shapes + 1, size, SUPERSAMPLE, size, SUPERSAMPLE).sum(axis=(2, 4))
    winner = votes.argmax(axis=0) - 1
    masks = [winner == index for index in range(num_shapes)]
    return Scene(np.clip(image, 0, 255).round().astype(np.uint8), masks, labels)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for one image: a pure function of (seed, split, index), so any worker order
    and any subset of indices gives the same images."""
    split_id = {"train": 0, "val": 1}[split]
    return np.random.default_rng([seed, split_id, index])
