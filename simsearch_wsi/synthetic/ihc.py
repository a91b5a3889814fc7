"""A synthetic brightfield IHC cell field (hematoxylin + DAB) with known per-cell staining.

Pixels are made in optical-density (OD) space by the Beer-Lambert law with given stain
vectors and then turned into uint8 RGB, so colour deconvolution with the same vectors gives
back each nucleus' DAB OD (up to 8-bit rounding). Each cell is a round nucleus of constant
hematoxylin and DAB OD, and a cytoplasm ring of its own (weaker) DAB OD; the background is
white with faint noise. Ground truth: centres, radii and the nucleus and cytoplasm DAB OD of
every cell, in the image's pixels (x right, y down, origin top-left).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.synthetic._cells import cell_grid

__all__ = ["DEFAULT_STAINS_RGB", "IhcCellField", "make_ihc_cell_field"]

#: hematoxylin and DAB OD vectors (r, g, b) of QuPath's default "H-DAB" stains
DEFAULT_STAINS_RGB: tuple[tuple[float, float, float], tuple[float, float, float]] = (
    (0.65111, 0.70119, 0.29049),
    (0.26917, 0.56824, 0.77759),
)


@dataclass(frozen=True)
class IhcCellField:
    """A synthetic IHC image and the truth of its cells.

    Attributes
    ----------
    rgb
        (H, W, 3) uint8 brightfield pixels.
    centers_xy
        (n, 2) nucleus centres (x, y), pixels with the origin at the top-left corner of the
        image (pixel (i, j) is centred at (j + 0.5, i + 0.5), as QuPath and
        :mod:`simsearch_wsi.infer.cells` place it).
    nucleus_radius_px
        (n,) nucleus radii, pixels.
    nucleus_dab_od
        (n,) DAB OD (log10 units, stain-vector normalised, as QuPath measures it) inside each
        nucleus.
    cytoplasm_dab_od
        (n,) DAB OD of each cell's cytoplasm ring.
    hematoxylin_od
        (n,) hematoxylin OD inside each nucleus.
    """

    rgb: NDArray[np.uint8]
    centers_xy: NDArray[np.float64]
    nucleus_radius_px: NDArray[np.float64]
    nucleus_dab_od: NDArray[np.float64]
    cytoplasm_dab_od: NDArray[np.float64]
    hematoxylin_od: NDArray[np.float64]


def _unit(v: Sequence[float]) -> NDArray[np.float64]:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


def make_ihc_cell_field(
    shape: tuple[int, int] = (256, 256),
    *,
    dab_levels: Sequence[float],
    seed: int = 0,
    pitch_px: float = 32.0,
    nucleus_radius_px: tuple[float, float] = (4.5, 6.0),
    cell_radius_factor: float = 1.5,
    hematoxylin_od: tuple[float, float] = (0.35, 0.55),
    cytoplasm_fraction: float = 0.3,
    stains_rgb: Sequence[Sequence[float]] = DEFAULT_STAINS_RGB,
) -> IhcCellField:
    """Draw separated IHC cells on a jittered grid, each nucleus with a DAB OD from a list.

    Parameters
    ----------
    shape
        (H, W) of the image in pixels.
    dab_levels
        Nucleus DAB OD values; cell ``i`` gets ``dab_levels[i % len(dab_levels)]`` (after a
        seeded shuffle of the cells), so the proportions are known exactly.
    seed
        Seed of every random choice (positions, radii, hematoxylin, noise).
    pitch_px
        Grid pitch of the cell centres, pixels; centres are jittered by up to 0.2 pitch per
        axis, so ``0.6 * pitch`` must exceed the largest cell diameter (cells never touch).
    nucleus_radius_px
        (low, high) uniform range of nucleus radii, pixels.
    cell_radius_factor
        Cell radius / nucleus radius (> 1); the ring between them is the cytoplasm.
    hematoxylin_od
        (low, high) uniform range of nucleus hematoxylin OD.
    cytoplasm_fraction
        Cytoplasm DAB OD as a fraction of the nucleus DAB OD.
    stains_rgb
        Hematoxylin and DAB OD vectors (r, g, b), normalised here.

    Returns
    -------
    IhcCellField
    """
    height, width = (int(shape[0]), int(shape[1]))
    levels = np.asarray(list(dab_levels), dtype=np.float64)
    if levels.size == 0 or not np.isfinite(levels).all() or (levels < 0).any():
        raise ConfigError(f"dab_levels must be finite OD values >= 0, got {list(dab_levels)!r}")
    r_lo, r_hi = nucleus_radius_px
    if not 0 < r_lo <= r_hi or cell_radius_factor <= 1:
        raise ConfigError("nucleus radii must be 0 < low <= high and cell_radius_factor > 1")
    if 0.6 * pitch_px <= 2 * r_hi * cell_radius_factor:
        raise ConfigError(
            f"pitch_px {pitch_px} lets cells touch; use more than "
            f"{2 * r_hi * cell_radius_factor / 0.6:g}"
        )
    if len(stains_rgb) != 2:
        raise ConfigError("stains_rgb must hold the hematoxylin and DAB vectors")
    h_vec, d_vec = _unit(stains_rgb[0]), _unit(stains_rgb[1])
    rng = np.random.default_rng(seed)
    margin = r_hi * cell_radius_factor + 2
    centers = cell_grid(rng, (height, width), pitch=pitch_px, margin=margin)
    n = len(centers)
    radii = rng.uniform(r_lo, r_hi, n)
    hema = rng.uniform(hematoxylin_od[0], hematoxylin_od[1], n)
    dab = levels[rng.permutation(np.arange(n)) % levels.size]
    cyto = cytoplasm_fraction * dab

    od_h = np.zeros((height, width), dtype=np.float64)
    od_d = np.zeros((height, width), dtype=np.float64)
    for (cx, cy), r, h, d, c in zip(centers, radii, hema, dab, cyto, strict=True):
        pad = int(np.ceil(r * cell_radius_factor)) + 1
        x0, y0 = max(0, int(cx) - pad), max(0, int(cy) - pad)
        x1, y1 = min(width, int(cx) + pad + 1), min(height, int(cy) + pad + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d2 = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2
        nuc = d2 <= r * r
        ring = (d2 <= (r * cell_radius_factor) ** 2) & ~nuc
        od_h[y0:y1, x0:x1][nuc] = h
        od_d[y0:y1, x0:x1][nuc] = d
        od_d[y0:y1, x0:x1][ring] = c
    od_rgb = od_h[..., None] * h_vec + od_d[..., None] * d_vec
    od_rgb += np.abs(0.004 * rng.standard_normal(od_rgb.shape))
    rgb = np.clip(np.rint(255.0 * np.power(10.0, -od_rgb)), 0, 255).astype(np.uint8)
    return IhcCellField(
        rgb=rgb,
        centers_xy=centers,
        nucleus_radius_px=radii,
        nucleus_dab_od=dab,
        cytoplasm_dab_od=cyto,
        hematoxylin_od=hema,
    )
