"""Helpers the generators share: seeded child streams, class checks, smooth noise, tissue,
soft shapes and RGBA canvases."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from simsearch_wsi.core.errors import ConfigError

__all__ = [
    "canvas_grid",
    "check_classes",
    "child_rngs",
    "rgba_canvas",
    "smooth_noise",
    "soft_disc",
    "tissue_layer",
]


def child_rngs(seed: int, n: int) -> list[np.random.Generator]:
    """``n`` independent generators derived from ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(n)]


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], *, cell_px: int, sigma_cells: float
) -> NDArray[np.float32]:
    """Smooth random field of unit standard deviation, float32 of ``shape`` (height, width).

    White noise on a coarse grid of ``cell_px``-pixel cells is Gaussian-blurred by
    ``sigma_cells`` cells and bilinearly upsampled; only the output is full size.
    """
    height, width = shape
    ch = max(3, -(-height // cell_px) + 1)
    cw = max(3, -(-width // cell_px) + 1)
    coarse = ndimage.gaussian_filter(rng.standard_normal((ch, cw)), sigma_cells, mode="reflect")
    coarse = (coarse - coarse.mean()) / (coarse.std() + 1e-12)
    out = ndimage.zoom(coarse.astype(np.float32), (height / ch, width / cw), order=1)
    return np.asarray(out[:height, :width], dtype=np.float32)


def tissue_layer(
    rng: np.random.Generator, shape: tuple[int, int], *, fraction: float = 0.5
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Irregular tissue regions covering about ``fraction`` of an image of ``shape`` (H, W).

    Returns the (H, W) float32 blend weight of the tissue layer (soft edges, 0..1) and the
    (H, W) bool mask ``weight >= 0.5``.
    """
    height, width = shape
    cell = max(8, max(height, width) // 24)
    field_ = smooth_noise(rng, shape, cell_px=cell, sigma_cells=1.3)
    # pull tissue away from the borders, like a section on a glass slide
    yy = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    xx = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    field_ -= 0.9 * (yy**4 + xx**4)
    ragged = smooth_noise(rng, shape, cell_px=max(4, cell // 8), sigma_cells=1.0)
    field_ += 0.12 * ragged  # ragged edges
    threshold = float(np.quantile(field_[::4, ::4], 1.0 - fraction))
    weight = np.clip((field_ - threshold) / 0.06 + 0.5, 0.0, 1.0, out=field_)
    return weight, weight >= 0.5


def soft_disc(
    yy: NDArray[np.float32],
    xx: NDArray[np.float32],
    *,
    center: tuple[float, float],
    radii: tuple[float, float],
    edge: float = 1.0,
) -> NDArray[np.float32]:
    """Anti-aliased filled ellipse on the grid ``yy, xx``: 1 inside, 0 outside, a ramp of about
    ``edge`` pixels; ``center`` is (cy, cx), ``radii`` (ry, rx)."""
    cy, cx = center
    ry, rx = radii
    d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) * min(ry, rx)
    return np.clip((min(ry, rx) - d) / edge + 0.5, 0.0, 1.0).astype(np.float32)


def canvas_grid(size: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """The (y, x) pixel coordinates of a square canvas of side ``size``, float32."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def rgba_canvas(alpha: NDArray[np.float32], rgb: Sequence[float]) -> NDArray[np.float32]:
    """A straight-alpha RGBA canvas: colour ``rgb`` everywhere, ``alpha`` as its alpha."""
    out = np.empty((*alpha.shape, 4), dtype=np.float32)
    out[..., :3] = np.asarray(rgb, dtype=np.float32)
    out[..., 3] = alpha
    return out


def check_classes(classes: Sequence[str], known: Sequence[str], *, what: str) -> tuple[str, ...]:
    """``classes`` as a tuple when non-empty, unique and all in ``known`` (``what``: the kind of
    class, for messages)."""
    if isinstance(classes, str):
        classes = (classes,)
    out = tuple(classes)
    if not out:
        raise ConfigError(f"classes must name at least one {what} class")
    if len(set(out)) != len(out):
        raise ConfigError(f"classes {out} contain duplicates")
    for name in out:
        if name not in known:
            raise ConfigError(
                f"unknown {what} class {name!r}; known classes: {', '.join(sorted(known))}"
            )
    return out
