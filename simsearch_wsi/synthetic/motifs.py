"""Brightfield motif painters: the classes a synthetic H&E-like slide can hold.

``ring``, ``cluster`` and ``stripes`` are the motifs; ``disc``, ``doublet`` and ``crosshatch``
are look-alikes of them (distractors for evaluations). Add an entry to :data:`MOTIF_PAINTERS` to
make a new class available.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.synthetic._common import canvas_grid, rgba_canvas, soft_disc

__all__ = ["MOTIF_PAINTERS", "MotifPainter"]

# A painter draws one motif on a square canvas of ``size_px`` pixels: it returns a float32
# (size_px, size_px, 4) array of straight (not premultiplied) RGB in 0..255 and alpha in 0..1.
# Everything drawn must lie inside the canvas' inscribed circle, so small rotations do not clip.
MotifPainter = Callable[[np.random.Generator, int], NDArray[np.float32]]


def _paint_ring(rng: np.random.Generator, size_px: int) -> NDArray[np.float32]:
    """A dark purple annulus (gland-like) with a pale lumen."""
    yy, xx = canvas_grid(size_px)
    c = (size_px - 1) / 2.0
    r_mid = 0.33 * size_px * rng.uniform(0.95, 1.05)
    half = max(1.2, 0.075 * size_px * rng.uniform(0.9, 1.1))
    squash = rng.uniform(0.85, 1.0)  # slightly elliptical
    d = np.sqrt((yy - c) ** 2 / squash**2 + (xx - c) ** 2)
    ring = np.clip(half - np.abs(d - r_mid) + 0.5, 0.0, 1.0)
    lumen = np.clip(r_mid - half - d + 0.5, 0.0, 1.0)
    rgba = np.zeros((size_px, size_px, 4), dtype=np.float32)
    ring_rgb = np.array([95.0, 35.0, 120.0], dtype=np.float32)
    lumen_rgb = np.array([246.0, 228.0, 238.0], dtype=np.float32)
    a = ring + 0.45 * lumen
    w_ring = ring / np.maximum(a, 1e-6)
    rgba[..., :3] = w_ring[..., None] * ring_rgb + (1.0 - w_ring[..., None]) * lumen_rgb
    rgba[..., 3] = np.clip(a, 0.0, 1.0)
    return rgba


def _paint_cluster(rng: np.random.Generator, size_px: int) -> NDArray[np.float32]:
    """A cluster of 5-9 small dark-blue nuclei."""
    yy, xx = canvas_grid(size_px)
    c = (size_px - 1) / 2.0
    n = int(rng.integers(5, 10))
    r_nuc = 0.085 * size_px
    spread = 0.26 * size_px
    centers: list[tuple[float, float]] = []
    for _ in range(200):
        if len(centers) == n:
            break
        ang, rad = rng.uniform(0, 2 * np.pi), spread * math.sqrt(rng.uniform(0.0, 1.0))
        cy, cx = c + rad * math.sin(ang), c + rad * math.cos(ang)
        if all(math.hypot(cy - py, cx - px) >= 1.7 * r_nuc for py, px in centers):
            centers.append((cy, cx))
    alpha = np.zeros((size_px, size_px), dtype=np.float32)
    for cy, cx in centers:
        ry, rx = r_nuc * rng.uniform(0.8, 1.2), r_nuc * rng.uniform(0.8, 1.2)
        np.maximum(alpha, soft_disc(yy, xx, center=(cy, cx), radii=(ry, rx)), out=alpha)
    return rgba_canvas(0.95 * alpha, (48.0, 42.0, 140.0))


def _paint_stripes(rng: np.random.Generator, size_px: int) -> NDArray[np.float32]:
    """Three or four parallel dark pink/purple bars."""
    yy, xx = canvas_grid(size_px)
    c = (size_px - 1) / 2.0
    n = int(rng.integers(3, 5))
    pitch = 0.19 * size_px
    half_thick = max(1.0, 0.05 * size_px * rng.uniform(0.9, 1.1))
    half_len = 0.3 * size_px
    wave = 0.03 * size_px * np.sin(xx * (2 * np.pi / (0.6 * size_px)) + rng.uniform(0, 2 * np.pi))
    alpha = np.zeros((size_px, size_px), dtype=np.float32)
    for i in range(n):
        y_i = c + (i - (n - 1) / 2.0) * pitch
        across = np.clip(half_thick - np.abs(yy - y_i - wave) + 0.5, 0.0, 1.0)
        along = np.clip(half_len - np.abs(xx - c) + 0.5, 0.0, 1.0)
        np.maximum(alpha, across * along, out=alpha)
    return rgba_canvas(0.92 * alpha, (168.0, 42.0, 108.0))


def _paint_disc(rng: np.random.Generator, size_px: int) -> NDArray[np.float32]:
    """A look-alike of ``ring``: a filled dark purple disc of the ring's size, no lumen."""
    yy, xx = canvas_grid(size_px)
    c = (size_px - 1) / 2.0
    r = 0.38 * size_px * rng.uniform(0.95, 1.05)
    alpha = soft_disc(yy, xx, center=(c, c), radii=(r * rng.uniform(0.85, 1.0), r))
    return rgba_canvas(0.9 * alpha, (100.0, 40.0, 122.0))


def _paint_doublet(rng: np.random.Generator, size_px: int) -> NDArray[np.float32]:
    """A look-alike of ``cluster``: two or three nuclei of the cluster's colour and size."""
    yy, xx = canvas_grid(size_px)
    c = (size_px - 1) / 2.0
    r_nuc = 0.085 * size_px
    alpha = np.zeros((size_px, size_px), dtype=np.float32)
    n = int(rng.integers(2, 4))
    phase = rng.uniform(0, 2 * np.pi)
    for k in range(n):
        ang = phase + 2 * np.pi * k / n
        cy, cx = c + 0.16 * size_px * math.sin(ang), c + 0.16 * size_px * math.cos(ang)
        np.maximum(alpha, soft_disc(yy, xx, center=(cy, cx), radii=(r_nuc, r_nuc)), out=alpha)
    return rgba_canvas(0.95 * alpha, (48.0, 42.0, 140.0))


def _paint_crosshatch(rng: np.random.Generator, size_px: int) -> NDArray[np.float32]:
    """A look-alike of ``stripes``: the stripes' bars crossed by as many at right angles."""
    a = _paint_stripes(rng, size_px)
    alpha = np.maximum(a[..., 3], a[..., 3].T)
    return rgba_canvas(alpha, (168.0, 42.0, 108.0))


# Motif painters by class name; add an entry to make a new class available. The last three are
# look-alikes of the first three (distractors for evaluations: stamp them, score the others).
MOTIF_PAINTERS: dict[str, MotifPainter] = {
    "ring": _paint_ring,
    "cluster": _paint_cluster,
    "stripes": _paint_stripes,
    "disc": _paint_disc,
    "doublet": _paint_doublet,
    "crosshatch": _paint_crosshatch,
}
