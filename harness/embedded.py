"""Embedded datasets: procedural images with real structure, generated from a seed, no download.

`shapes`: one to three coloured discs, squares and triangles (random position, size, rotation, colour) over a
smooth two-colour gradient. `faces`: a toy CelebA: a skin-tone oval under a hair cap, two eyes, eyebrows, a
mouth and shoulders, varied in pose, proportions and colours.

Everything is drawn in normalised coordinates ([0, 1] across the image) with anti-aliased edges, so the same
seed gives the same images at every resolution. Images are drawn in chunks of `CHUNK` seeded by
`(seed, chunk index)`, so image i does not depend on how many images were asked for: the first 1000 images of
a 4096-image dataset are the 1000-image dataset. Change `GENERATOR_VERSION` whenever the drawing changes; it is
part of the dataset's content id, which keys cached FID reference statistics.
"""
from __future__ import annotations

import functools
import math

import numpy as np

GENERATOR_VERSION = 1
CHUNK = 1024
SOURCES = ("shapes", "faces")

# Saturated colours for shapes, muted ones for backgrounds; faces get skin and hair palettes.
_SHAPE_COLOURS = np.array(
    [[230, 40, 40], [40, 170, 60], [40, 80, 220], [240, 200, 30], [200, 60, 200], [30, 190, 200],
     [250, 130, 20], [245, 245, 245], [25, 25, 25]], dtype=np.float32) / 255.0
_SKIN = np.array([[255, 224, 196], [241, 194, 150], [224, 172, 125], [198, 134, 88], [141, 85, 54],
                  [92, 58, 40]], dtype=np.float32) / 255.0
_HAIR = np.array([[20, 15, 12], [60, 40, 25], [110, 70, 35], [200, 160, 90], [160, 60, 30],
                  [150, 150, 150]], dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=2)
def generate(source: str, num_images: int, resolution: int, seed: int = 0) -> np.ndarray:
    """`num_images` images of `source` as uint8 [N, H, W, 3]; deterministic in (source, seed, resolution).

    Read-only and remembered (the last two asked for): a run builds its dataset once per stage and again for the
    FID reference and noise floor, and drawing 4096 faces takes ~2.5 s each time."""
    if source not in SOURCES:
        raise ValueError(f"unknown embedded source {source!r}; choose one of {SOURCES}")
    draw = _draw_shapes if source == "shapes" else _draw_faces
    images = np.zeros((num_images, resolution, resolution, 3), np.uint8)
    for start in range(0, num_images, CHUNK):
        n = min(CHUNK, num_images - start)
        drawn = draw(_ChunkRng(np.random.default_rng([seed, start // CHUNK]), n), n, resolution)
        images[start:start + n] = np.clip(np.rint(drawn * 255.0), 0, 255)
    images.setflags(write=False)
    return images


class _ChunkRng:
    """Draws each parameter for a whole chunk and keeps the first `n`, so image i never depends on n."""

    def __init__(self, rng: np.random.Generator, n: int):
        self.rng, self.n = rng, n

    def _draw(self, method, a, b, size) -> np.ndarray:
        size = (size,) if isinstance(size, int) else tuple(size)
        assert size[0] == self.n, "every draw is one value (or row) per image"
        return method(a, b, (CHUNK, *size[1:]))[:self.n]

    def uniform(self, low, high, size):
        return self._draw(self.rng.uniform, low, high, size)

    def normal(self, mean, std, size):
        return self._draw(self.rng.normal, mean, std, size)

    def integers(self, low, high, size):
        return self._draw(self.rng.integers, low, high, size)


# ---------------------------------------------------------------------------------------------- primitives
def _grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1], shaped [1, H, W] for broadcasting against per-image parameters."""
    c = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    return c[None, None, :], c[None, :, None]  # x varies along W, y along H


def _col(values: np.ndarray) -> np.ndarray:
    """Per-image scalars [N] -> [N, 1, 1] so they broadcast over the pixel grid."""
    return values.astype(np.float32)[:, None, None]


def _coverage(signed_distance: np.ndarray, resolution: int) -> np.ndarray:
    """Anti-aliased fill: 1 inside, 0 outside, a one-pixel linear ramp across the edge."""
    return np.clip(0.5 - signed_distance * resolution, 0.0, 1.0)


def _paint(image: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Alpha-blend a per-image colour [N, 3] into image [N, H, W, 3] where alpha [N, H, W] says."""
    a = alpha[..., None]
    return image * (1.0 - a) + colour[:, None, None, :] * a


def _ellipse(x, y, cx, cy, rx, ry, resolution):
    """Coverage of axis-aligned ellipses (an approximate distance: exact on circles, fine for 1-px edges)."""
    dx, dy = (x - _col(cx)) / _col(rx), (y - _col(cy)) / _col(ry)
    return _coverage((np.sqrt(dx * dx + dy * dy) - 1.0) * _col(np.minimum(rx, ry)), resolution)


def _gradient(rng, n, x, y, low: float, high: float) -> np.ndarray:
    """Smooth two-colour backgrounds along a random direction, [N, H, W, 3]."""
    angle = rng.uniform(0, 2 * np.pi, n)
    c0, c1 = rng.uniform(low, high, (n, 3)), rng.uniform(low, high, (n, 3))
    t = (x - 0.5) * _col(np.cos(angle)) + (y - 0.5) * _col(np.sin(angle)) + 0.5  # [N, H, W]
    t = np.clip(t, 0.0, 1.0)[..., None]
    return (c0[:, None, None, :] * (1 - t) + c1[:, None, None, :] * t).astype(np.float32)


# ---------------------------------------------------------------------------------------------- shapes
def _draw_shapes(rng: _ChunkRng, n: int, resolution: int) -> np.ndarray:
    x, y = _grid(resolution)
    image = _gradient(rng, n, x, y, 0.15, 0.85)
    count = rng.integers(1, 4, n)  # one to three shapes per image
    for slot in range(3):
        kind = rng.integers(0, 3, n)  # 0 disc, 1 square, 2 triangle
        size = rng.uniform(0.12, 0.28, n)  # radius / half-side, as a fraction of the image
        cx = size + rng.uniform(0, 1, n) * (1 - 2 * size)  # the whole shape stays inside the image
        cy = size + rng.uniform(0, 1, n) * (1 - 2 * size)
        angle = rng.uniform(0, 2 * np.pi, n)
        colour = _SHAPE_COLOURS[rng.integers(0, len(_SHAPE_COLOURS), n)]
        # Rotate the pixel grid into each shape's own frame.
        dx, dy = x - _col(cx), y - _col(cy)
        cos, sin = _col(np.cos(angle)), _col(np.sin(angle))
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos
        r = _col(size)
        disc = np.sqrt(u * u + v * v) - r
        square = np.maximum(np.abs(u), np.abs(v)) - 0.85 * r
        # Equilateral triangle: the largest of three half-plane distances (exact inside, close enough outside).
        normals = [(0.0, -1.0), (math.sqrt(3) / 2, 0.5), (-math.sqrt(3) / 2, 0.5)]
        triangle = np.max([u * a + v * b for a, b in normals], axis=0) - 0.6 * r
        distance = np.where(_col(kind) == 0, disc, np.where(_col(kind) == 1, square, triangle))
        alpha = _coverage(distance, resolution) * _col(slot < count)
        image = _paint(image, alpha, colour)
    return image


# ---------------------------------------------------------------------------------------------- faces
def _draw_faces(rng: _ChunkRng, n: int, resolution: int) -> np.ndarray:
    x, y = _grid(resolution)
    image = _gradient(rng, n, x, y, 0.25, 0.9)
    skin = _mix(rng, _SKIN, n)
    hair = _mix(rng, _HAIR, n)
    shirt = rng.uniform(0.1, 0.9, (n, 3)).astype(np.float32)

    cx = 0.5 + rng.normal(0, 0.03, n)  # faces are roughly aligned, as in CelebA
    cy = 0.47 + rng.normal(0, 0.025, n)
    rx = rng.uniform(0.2, 0.26, n)
    ry = rx * rng.uniform(1.2, 1.4, n)
    tilt = rng.normal(0, 0.08, n)  # head roll, radians
    # Coordinates in the face's frame (rotated about the face centre) for every feature of the head.
    dx, dy = x - _col(cx), y - _col(cy)
    cos, sin = _col(np.cos(tilt)), _col(np.sin(tilt))
    fx, fy = dx * cos + dy * sin, -dx * sin + dy * cos
    zero = np.zeros(n, np.float32)

    # Shoulders: a wide ellipse at the bottom (not rotated with the head).
    image = _paint(image, _ellipse(x, y, cx, zero + 1.05, rx * 2.1, zero + 0.22, resolution), shirt)
    image = _paint(image, _ellipse(x, y, cx, cy + ry * 0.95, rx * 0.45, ry * 0.4, resolution), skin * 0.9)
    # Hair: a larger ellipse behind the face, shifted up; its length varies from a cap to long hair.
    hair_len = rng.uniform(0.0, 0.6, n)
    hair_alpha = _ellipse(fx, fy, zero, -ry * (0.12 - 0.2 * hair_len), rx * 1.15, ry * (1.05 + 0.2 * hair_len),
                          resolution)
    image = _paint(image, hair_alpha * _col(rng.uniform(0, 1, n) > 0.05), hair)
    # Face oval, then a fringe: the hair ellipse clipped to the forehead band.
    image = _paint(image, _ellipse(fx, fy, zero, zero, rx, ry, resolution), skin)
    fringe = _ellipse(fx, fy, zero, -ry * 0.95, rx * 1.02, ry * rng.uniform(0.35, 0.6, n), resolution)
    image = _paint(image, fringe * _coverage(fy + _col(ry * 0.45), resolution), hair)

    eye_dx = rx * rng.uniform(0.36, 0.46, n)
    eye_y = -ry * rng.uniform(0.08, 0.18, n)
    eye_r = rx * rng.uniform(0.13, 0.18, n)
    iris = _mix(rng, np.array([[0.25, 0.15, 0.08], [0.2, 0.35, 0.6], [0.3, 0.45, 0.25]], np.float32), n)
    white = np.full((n, 3), 0.95, np.float32)
    for side in (-1.0, 1.0):
        ex = side * eye_dx
        image = _paint(image, _ellipse(fx, fy, ex, eye_y, eye_r * 1.4, eye_r * 0.8, resolution), white)
        image = _paint(image, _ellipse(fx, fy, ex, eye_y, eye_r * 0.7, eye_r * 0.7, resolution), iris)
        brow = _ellipse(fx, fy, ex, eye_y - eye_r * 1.7, eye_r * 1.6, eye_r * 0.35, resolution)
        image = _paint(image, brow, hair * 0.8)
    # Nose: a slightly darker small ellipse; mouth: a red ellipse, smiling ones cut by a shifted copy.
    nose = _ellipse(fx, fy, zero, ry * 0.18, rx * 0.1, ry * 0.12, resolution)
    image = _paint(image, nose * 0.5, skin * 0.75)
    mouth_y = ry * rng.uniform(0.45, 0.55, n)
    mouth_w = rx * rng.uniform(0.3, 0.5, n)
    mouth_h = ry * rng.uniform(0.05, 0.14, n)
    smile = _col(rng.uniform(0, 1, n) < 0.5)
    mouth = _ellipse(fx, fy, zero, mouth_y, mouth_w, mouth_h, resolution)
    cut = _ellipse(fx, fy, zero, mouth_y - mouth_h * 0.8, mouth_w * 1.1, mouth_h, resolution)
    lips = np.array([[0.75, 0.25, 0.3]], np.float32) * rng.uniform(0.7, 1.0, (n, 1)).astype(np.float32)
    image = _paint(image, mouth * (1.0 - smile * cut), lips)
    return image


def _mix(rng: _ChunkRng, palette: np.ndarray, n: int) -> np.ndarray:
    """Colours between two neighbouring palette entries, so the family is continuous rather than 6 clusters."""
    i = rng.integers(0, len(palette) - 1, n)
    t = rng.uniform(0, 1, (n, 1)).astype(np.float32)
    return palette[i] * (1 - t) + palette[i + 1] * t
