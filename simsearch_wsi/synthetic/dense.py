"""Dense fields of small objects with every object in the truth: nuclei of a 16-bit
fluorescence field, or red blood cells of a brightfield smear (:func:`make_dense_field`).

Unlike the other generators, which stamp a few well-separated motifs, every object here is a
scored object of one class and neighbours may touch (or overlap) each other: this is what
counting nuclei or blood cells looks like, and what tests whether suggestions and detections
can reach every one of many crowded objects.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.checks import check_positive_int
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import validate_mpp
from simsearch_wsi.io.pyramid import area_pyramid, check_n_levels
from simsearch_wsi.io.tiff_writer import write_pyramidal_tiff
from simsearch_wsi.synthetic._cells import to_dtype
from simsearch_wsi.synthetic._common import child_rngs, smooth_noise, soft_disc
from simsearch_wsi.synthetic.fluorescence import _write_ome_tiff
from simsearch_wsi.synthetic.truth import SyntheticObject, SyntheticSlide

__all__ = ["DENSE_KINDS", "dense_centres", "make_dense_field"]

#: the kinds of dense field and the class of their objects
DENSE_KINDS: dict[str, str] = {"fluorescence": "nucleus", "blood": "rbc"}


def dense_centres(
    rng: np.random.Generator,
    shape: tuple[int, int],
    *,
    radius: float,
    spacing: float,
    fill: float,
    margin: float,
) -> NDArray[np.float64]:
    """Random object centres (n, 2) as (x, y) in an image of ``shape`` (H, W): darts thrown
    until none fits, each at least ``spacing * 2 * radius`` from every other (``spacing`` < 1
    lets objects overlap, 1 lets them touch), ``margin`` px inside the border, then thinned
    at random to ``fill`` (0..1] of the packing."""
    height, width = shape
    d_min = spacing * 2.0 * radius
    cell = d_min / math.sqrt(2.0)
    gh, gw = int(height / cell) + 1, int(width / cell) + 1
    grid = -np.ones((gh, gw), dtype=np.int64)
    pts: list[tuple[float, float]] = []
    misses = 0
    while misses < 3000:
        x = float(rng.uniform(margin, width - margin))
        y = float(rng.uniform(margin, height - margin))
        gi, gj = int(y / cell), int(x / cell)
        ok = True
        for i in range(max(0, gi - 2), min(gh, gi + 3)):
            for j in range(max(0, gj - 2), min(gw, gj + 3)):
                k = grid[i, j]
                if k >= 0 and math.hypot(pts[k][0] - x, pts[k][1] - y) < d_min:
                    ok = False
                    break
            if not ok:
                break
        if not ok:
            misses += 1
            continue
        misses = 0
        grid[gi, gj] = len(pts)
        pts.append((x, y))
    arr = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    keep = rng.permutation(len(arr))[: max(1, round(fill * len(arr)))]
    return arr[np.sort(keep)]


def _paint_fluorescence(
    rng: np.random.Generator,
    centres: NDArray[np.float64],
    radii: NDArray[np.float64],
    shape: tuple[int, int],
) -> NDArray[np.float32]:
    """(2, H, W) intensities 0..1: textured nuclei (DAPI) and a faint cytoplasm (GFP)."""
    height, width = shape
    planes = np.full((2, height, width), 0.012, dtype=np.float32)
    planes += 0.004 * rng.standard_normal((2, height, width), dtype=np.float32)
    planes[1] += 0.01 * np.clip(smooth_noise(rng, shape, cell_px=24, sigma_cells=1.0), -2, 2)
    for (cx, cy), (ry, rx) in zip(centres.tolist(), radii.tolist(), strict=True):
        pad = math.ceil(2.0 * max(ry, rx)) + 2
        x0, y0 = max(0, int(cx) - pad), max(0, int(cy) - pad)
        x1, y1 = min(width, int(cx) + pad + 1), min(height, int(cy) + pad + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        nucleus = soft_disc(yy, xx, center=(cy, cx), radii=(ry, rx))
        texture = 1.0 + 0.15 * rng.standard_normal(nucleus.shape).astype(np.float32)
        # touching nuclei do not add up: the brighter one shows
        tile = rng.uniform(0.3, 0.6) * nucleus * texture
        np.maximum(planes[0, y0:y1, x0:x1], tile + 0.012, out=planes[0, y0:y1, x0:x1])
        cyto = soft_disc(yy, xx, center=(cy, cx), radii=(1.8 * ry, 1.8 * rx))
        planes[1, y0:y1, x0:x1] += rng.uniform(0.02, 0.05) * cyto * (1.0 - nucleus)
    return planes


def _paint_blood(
    rng: np.random.Generator,
    centres: NDArray[np.float64],
    radii: NDArray[np.float64],
    shape: tuple[int, int],
) -> NDArray[np.uint8]:
    """(H, W, 3) uint8 RGB: pink biconcave discs (pale centre, darker rim) on a light field."""
    height, width = shape
    absorb = np.zeros((height, width), dtype=np.float32)
    for (cx, cy), (ry, rx) in zip(centres.tolist(), radii.tolist(), strict=True):
        pad = math.ceil(max(ry, rx)) + 2
        x0, y0 = max(0, int(cx) - pad), max(0, int(cy) - pad)
        x1, y1 = min(width, int(cx) + pad + 1), min(height, int(cy) + pad + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        disc = soft_disc(yy, xx, center=(cy, cx), radii=(ry, rx))
        pallor = soft_disc(yy, xx, center=(cy, cx), radii=(0.45 * ry, 0.45 * rx), edge=2.0)
        rim = disc * (1.0 - 0.55 * pallor) * rng.uniform(0.8, 1.1)
        np.maximum(absorb[y0:y1, x0:x1], rim, out=absorb[y0:y1, x0:x1])
    absorb += 0.05 * smooth_noise(rng, shape, cell_px=32, sigma_cells=1.0)
    # optical densities of a pink (eosin-like) cell on a near-white background
    od = np.asarray([0.15, 0.75, 0.45], dtype=np.float32)
    rgb = 245.0 * np.exp(-absorb[..., None] * od[None, None, :])
    rgb += 3.0 * rng.standard_normal(rgb.shape).astype(np.float32)
    out: NDArray[np.uint8] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return out


def make_dense_field(
    path: str | Path,
    *,
    kind: Literal["fluorescence", "blood"] = "fluorescence",
    width: int = 512,
    height: int = 512,
    radius: float = 7.0,
    spacing: float = 1.15,
    fill: float = 1.0,
    mpp: float = 0.325,
    n_levels: int = 1,
    seed: int = 0,
) -> SyntheticSlide:
    """Write a dense field of round objects of one class, every one of them in the truth.

    ``kind`` ``"fluorescence"``: a uint16 two-channel OME-TIFF (``DAPI`` nuclei with texture,
    ``GFP`` faint cytoplasm), objects of class ``nucleus``; ``"blood"``: a uint8 RGB pyramidal
    TIFF of red blood cells (pale centre) on a light field, class ``rbc``. Objects have radii of
    ``radius`` px (each axis jittered by +-15 %), centres at least ``spacing x 2 x radius``
    apart (below 1 they overlap), packed as densely as random placement allows and thinned to
    ``fill`` of that. Each object's box is its ellipse's bounding box (level-0 px); the box
    centre is the object's centre.
    """
    if kind not in DENSE_KINDS:
        raise ConfigError(f"dense field kind must be one of {sorted(DENSE_KINDS)}, got {kind!r}")
    out = Path(path)
    mpp = validate_mpp(mpp, source="make_dense_field")
    width = check_positive_int("width", width)
    height = check_positive_int("height", height)
    n_levels = check_n_levels(n_levels, width=width, height=height)
    if not (math.isfinite(radius) and 2.0 <= radius <= min(width, height) / 4):
        raise ConfigError(f"radius must be 2..{min(width, height) / 4:g} px, got {radius!r}")
    if not (math.isfinite(spacing) and 0.6 <= spacing <= 4.0):
        raise ConfigError(f"spacing must be 0.6..4 object diameters, got {spacing!r}")
    if not (math.isfinite(fill) and 0.0 < fill <= 1.0):
        raise ConfigError(f"fill must be in (0, 1], got {fill!r}")
    rng_place, rng_shape, rng_paint, rng_id = child_rngs(seed, 4)
    centres = dense_centres(
        rng_place,
        (height, width),
        radius=radius,
        spacing=spacing,
        fill=fill,
        margin=1.2 * radius,
    )
    radii = radius * rng_shape.uniform(0.85, 1.15, size=(len(centres), 2))
    class_name = DENSE_KINDS[kind]
    objects = tuple(
        SyntheticObject(class_name, cx - rx, cy - ry, 2.0 * rx, 2.0 * ry)
        for (cx, cy), (ry, rx) in zip(centres.tolist(), radii.tolist(), strict=True)
    )
    if kind == "fluorescence":
        data = to_dtype(
            _paint_fluorescence(rng_paint, centres, radii, (height, width)), np.dtype(np.uint16)
        )
        channel_names: tuple[str, ...] = ("DAPI", "GFP")
        _write_ome_tiff(
            out,
            area_pyramid(data, n_levels, y_axis=1),
            mpp=mpp,
            channel_names=channel_names,
            tile=256,
            file_uuid=str(uuid.UUID(bytes=rng_id.bytes(16), version=4)),
        )
        fmt = "ome-tiff"
    else:
        rgb = _paint_blood(rng_paint, centres, radii, (height, width))
        write_pyramidal_tiff(out, rgb, mpp=mpp, n_levels=n_levels)
        channel_names = ("R", "G", "B")
        fmt = "tiff"
    return SyntheticSlide(
        path=out,
        objects=objects,
        classes=(class_name,),
        mpp=mpp,
        width=width,
        height=height,
        tissue_mask=np.ones((height, width), dtype=bool),
        seed=int(seed),
        channel_names=channel_names,
        n_levels=n_levels,
        format=fmt,
    )
