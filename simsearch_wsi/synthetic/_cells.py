"""Fluorescent cells on (C, H, W) float planes, shared by the fluorescence slide and the plate:
channel 0 nuclei, channel 1 a nuclear or cytoplasmic reporter, further channels a weak
membrane."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.synthetic._common import soft_disc

__all__ = ["background_planes", "cell_grid", "full_scale", "stamp_cell", "to_dtype"]


def full_scale(dtype: np.dtype[Any]) -> float:
    """The intensity that stands for 100 %: the integer maximum, 1.0 for floats."""
    if np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).max)
    if np.issubdtype(dtype, np.floating):
        return 1.0
    raise ConfigError(f"dtype must be an integer or float type, got {dtype}")


def to_dtype(planes: NDArray[np.float32], dtype: np.dtype[Any]) -> NDArray[Any]:
    """Convert intensities in 0..1 of full scale to ``dtype`` (clipped, rounded for integers)."""
    scale = full_scale(dtype)
    if np.issubdtype(dtype, np.integer):
        scaled: NDArray[np.float32] = np.clip(np.rint(planes * scale), 0, scale)
        return scaled.astype(dtype)
    clipped: NDArray[np.float32] = np.clip(planes, 0.0, 1.0)
    return clipped.astype(dtype)


def stamp_cell(
    planes: NDArray[np.float32],
    center_xy: tuple[float, float],
    *,
    r_nuc: float,
    r_cell: float,
    rng: np.random.Generator,
    reporter: Literal["none", "nuclear", "cytoplasmic"],
) -> None:
    """Add one cell centred at ``center_xy`` (x, y) to (C, H, W) float planes (channel 0 nuclei,
    1 reporter, 2.. membrane); ``r_nuc`` and ``r_cell`` are the nucleus and cell radii."""
    cx, cy = center_xy
    _, height, width = planes.shape
    pad = math.ceil(r_cell) + 2
    x0, y0 = max(0, int(cx) - pad), max(0, int(cy) - pad)
    x1, y1 = min(width, int(cx) + pad + 1), min(height, int(cy) + pad + 1)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    ry, rx = r_nuc * rng.uniform(0.85, 1.15), r_nuc * rng.uniform(0.85, 1.15)
    nucleus = soft_disc(yy, xx, center=(cy, cx), radii=(ry, rx))
    texture = 1.0 + 0.12 * rng.standard_normal(nucleus.shape).astype(np.float32)
    planes[0, y0:y1, x0:x1] += rng.uniform(0.35, 0.6) * nucleus * texture
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    if reporter == "nuclear":
        planes[1, y0:y1, x0:x1] += rng.uniform(0.4, 0.6) * nucleus
    elif reporter == "cytoplasmic":
        r_in = max(ry, rx) + 1.0
        cyto = np.clip(np.minimum(d - r_in, r_cell - 1.0 - d) + 0.5, 0.0, 1.0)
        planes[1, y0:y1, x0:x1] += rng.uniform(0.3, 0.5) * cyto
    if planes.shape[0] > 2:
        membrane = np.clip(1.2 - np.abs(d - r_cell), 0.0, 1.0)
        planes[2:, y0:y1, x0:x1] += rng.uniform(0.04, 0.08) * membrane


def cell_grid(
    rng: np.random.Generator, shape: tuple[int, int], *, pitch: float, margin: float
) -> NDArray[np.float64]:
    """Jittered-grid (n, 2) cell centres (x, y) in an image of ``shape`` (H, W), at least
    ``margin`` from its border."""
    height, width = shape
    xs = np.arange(margin, width - margin, pitch)
    ys = np.arange(margin, height - margin, pitch)
    gx, gy = np.meshgrid(xs, ys)
    pts = np.stack([gx.ravel(), gy.ravel()], axis=1)
    pts += rng.uniform(-0.2 * pitch, 0.2 * pitch, pts.shape)
    np.clip(pts[:, 0], margin, width - 1 - margin, out=pts[:, 0])
    np.clip(pts[:, 1], margin, height - 1 - margin, out=pts[:, 1])
    return pts


def background_planes(
    rng: np.random.Generator, shape: tuple[int, int, int], *, level: float
) -> NDArray[np.float32]:
    """(C, H, W) = ``shape`` float32 planes at ``level`` with faint Gaussian noise."""
    n_channels, height, width = shape
    planes = np.empty((n_channels, height, width), dtype=np.float32)
    for c in range(n_channels):
        planes[c] = level + 0.004 * rng.standard_normal((height, width), dtype=np.float32)
    return planes
