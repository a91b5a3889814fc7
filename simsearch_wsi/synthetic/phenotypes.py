"""A synthetic OME-Zarr HCS plate of separate cells with three reporter phenotypes (issue 30):
:func:`make_phenotype_plate`.

Each field is a sparse field of separate cells, like a high-content screen of U2OS cells: a DNA
channel (nuclei) and a reporter channel ("GFP") that is absent (``no_gfp``), in the cytoplasm
(``cytoplasmic_gfp``) or in the nucleus (``nuclear_gfp``). Cells vary in size (``diameter_px``,
13-80 px by default), elongation, orientation, nucleus size and position, and brightness; the
plate has technical effects: a gain per well and channel, a background offset and a smooth
illumination gradient per field, and shot noise. The pixel size can be left out of the metadata
(``mpp=None``), as in many exported screens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.checks import check_positive_int
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import validate_mpp
from simsearch_wsi.io.ngff import ngff_format
from simsearch_wsi.io.omezarr_writer import write_multiscale_group
from simsearch_wsi.io.pyramid import area_pyramid
from simsearch_wsi.synthetic._cells import to_dtype
from simsearch_wsi.synthetic._common import child_rngs

__all__ = ["PHENOTYPES", "PhenotypeCell", "PhenotypePlate", "make_phenotype_plate"]

#: the phenotypes, in class order
PHENOTYPES: tuple[str, ...] = ("no_gfp", "cytoplasmic_gfp", "nuclear_gfp")

_PLATE_FORMAT = ngff_format("0.4")


@dataclass(frozen=True)
class PhenotypeCell:
    """One cell: centre (level-0 pixels of its field), phenotype, and diameter in pixels."""

    x_l0: float
    y_l0: float
    phenotype: str
    diameter_px: float


@dataclass(frozen=True)
class PhenotypePlate:
    """The plate on disk and its truth: ``cells[(well, field)]`` with wells named ``A1``."""

    path: Path
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    fields_per_well: int
    channel_names: tuple[str, ...]
    mpp: float | None
    field_size: int
    cells: dict[tuple[str, int], tuple[PhenotypeCell, ...]]

    def field_path(self, well: str, field: int) -> Path:
        """The field's image folder, ``<plate>/<row>/<column>/<field>``."""
        row = next(r for r in self.rows if well.startswith(r) and well[len(r) :] in self.columns)
        return self.path / row / well[len(row) :] / str(field)


def _rotated_ellipse(
    yy: NDArray[np.float32],
    xx: NDArray[np.float32],
    *,
    center: tuple[float, float],
    radii: tuple[float, float],
    angle: float,
) -> NDArray[np.float32]:
    """Anti-aliased filled ellipse (1 inside, 0 outside, a 1-px ramp); ``center`` (cy, cx),
    ``radii`` (ry, rx) before rotation by ``angle`` radians."""
    cy, cx = center
    ry, rx = radii
    c, s = math.cos(angle), math.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    rho = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    r_min = min(rx, ry)
    out: NDArray[np.float32] = np.clip((1.0 - rho) * r_min + 0.5, 0.0, 1.0).astype(np.float32)
    return out


def _place_cells(
    rng: np.random.Generator,
    size: int,
    n: int,
    diameters: tuple[float, float],
    gap_px: float,
) -> list[tuple[float, float, float]]:
    """Up to ``n`` non-touching cells (cx, cy, radius) by rejection sampling."""
    placed: list[tuple[float, float, float]] = []
    lo, hi = diameters
    for _ in range(n * 60):
        if len(placed) >= n:
            break
        # log-uniform diameters: small and large cells equally represented per octave
        d = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        r = d / 2.0
        margin = r * 1.25 + 2.0
        if size - 2 * margin <= 0:
            continue
        cx, cy = rng.uniform(margin, size - margin, 2)
        if all(math.hypot(cx - x, cy - y) > 1.25 * (r + q) + gap_px for x, y, q in placed):
            placed.append((float(cx), float(cy), r))
    return placed


def _stamp(
    planes: NDArray[np.float32],
    cell: tuple[float, float, float],
    phenotype: str,
    rng: np.random.Generator,
    *,
    dna: int,
    gfp: int,
) -> None:
    """Add one cell to (C, H, W) planes: its nucleus to channel ``dna``, its reporter to
    ``gfp``."""
    cx, cy, r = cell
    _, height, width = planes.shape
    elong = rng.uniform(1.0, 1.35)
    rx, ry = r * elong, r / elong
    angle = rng.uniform(0.0, math.pi)
    pad = math.ceil(max(rx, ry)) + 2
    x0, y0 = max(0, int(cx) - pad), max(0, int(cy) - pad)
    x1, y1 = min(width, int(cx) + pad + 1), min(height, int(cy) + pad + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    body = _rotated_ellipse(yy, xx, center=(cy, cx), radii=(ry, rx), angle=angle)
    frac = rng.uniform(0.38, 0.55)
    off = rng.uniform(0.0, 0.18) * r
    phi = rng.uniform(0.0, 2 * math.pi)
    ncx, ncy = cx + off * math.cos(phi), cy + off * math.sin(phi)
    nr = max(2.5, frac * r)
    ne = rng.uniform(1.0, 1.25)
    nucleus = _rotated_ellipse(
        yy, xx, center=(ncy, ncx), radii=(nr / ne, nr * ne), angle=rng.uniform(0.0, math.pi)
    )
    nucleus = np.minimum(nucleus, body)
    cytoplasm = np.clip(body - nucleus, 0.0, 1.0)
    texture = 1.0 + 0.15 * rng.standard_normal(body.shape).astype(np.float32)
    planes[dna, y0:y1, x0:x1] += rng.uniform(0.3, 0.75) * nucleus * texture
    level = rng.uniform(0.2, 0.7)
    gtex = 1.0 + 0.2 * rng.standard_normal(body.shape).astype(np.float32)
    if phenotype == "no_gfp":
        reporter = rng.uniform(0.01, 0.04) * body  # autofluorescence only
    elif phenotype == "cytoplasmic_gfp":
        reporter = level * (cytoplasm + rng.uniform(0.05, 0.2) * nucleus) * gtex
    elif phenotype == "nuclear_gfp":
        reporter = level * (nucleus + rng.uniform(0.03, 0.15) * cytoplasm) * gtex
    else:
        raise ConfigError(f"unknown phenotype {phenotype!r}; known: {', '.join(PHENOTYPES)}")
    planes[gfp, y0:y1, x0:x1] += reporter


def make_phenotype_plate(
    path: str | Path,
    *,
    rows: Sequence[str] = ("A", "B"),
    columns: Sequence[str] = ("1", "2", "3"),
    fields_per_well: int = 2,
    field_size: int = 512,
    cells_per_field: int = 24,
    diameter_px: tuple[float, float] = (13.0, 80.0),
    channels: Sequence[str] = ("GFP", "DNA"),
    dtype: str = "uint8",
    mpp: float | None = None,
    plate_effect: float = 0.25,
    seed: int = 0,
) -> PhenotypePlate:
    """Write an OME-Zarr HCS plate (NGFF 0.4, Zarr v2) of separate cells of three phenotypes.

    Parameters
    ----------
    path
        the plate folder to create (``*.ome.zarr``).
    rows, columns
        well rows and columns; wells ``A/1`` ... each with ``fields_per_well`` fields.
    field_size
        side of each (square) field in pixels.
    cells_per_field
        cells placed per field (fewer if they do not fit without touching); their phenotypes
        cycle through :data:`PHENOTYPES` in a random order, so every field has all three.
    diameter_px
        (min, max) cell diameter in pixels, drawn log-uniformly.
    channels
        (reporter, DNA) channel names, in the order written.
    dtype
        ``"uint8"`` or ``"uint16"``.
    mpp
        level-0 pixel size written into the metadata, or ``None`` for none.
    plate_effect
        standard deviation of the log gain per well and channel (0: no plate effect); each
        field also gets a random background offset and illumination gradient.
    seed
        the same seed gives the same pixels and truth.
    """
    fmt = _PLATE_FORMAT
    row_names, col_names = tuple(rows), tuple(columns)
    for kind, names in (("row", row_names), ("column", col_names)):
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"plate {kind} names must be non-empty and unique, got {names}")
        for name in names:
            if not name.isascii() or not name.isalnum():
                raise ConfigError(f"plate {kind} name {name!r} must be ASCII letters/digits only")
    n_fields = check_positive_int("fields_per_well", fields_per_well)
    size = check_positive_int("field_size", field_size, minimum=64)
    n_cells = check_positive_int("cells_per_field", cells_per_field)
    channel_names = tuple(channels)
    if len(channel_names) != 2 or len(set(channel_names)) != 2:
        raise ConfigError(f"channels must be two names (reporter, DNA), got {channel_names}")
    if dtype not in ("uint8", "uint16"):
        raise ConfigError(f"dtype must be 'uint8' or 'uint16', got {dtype!r}")
    lo, hi = (float(v) for v in diameter_px)
    if not 4.0 <= lo <= hi <= size / 2:
        raise ConfigError("diameter_px must be (min, max) with 4 <= min <= max <= field_size/2")
    if mpp is not None:
        mpp = validate_mpp(mpp, source="make_phenotype_plate")
    if not math.isfinite(plate_effect) or plate_effect < 0:
        raise ConfigError(f"plate_effect must be >= 0, got {plate_effect!r}")
    well_rngs = child_rngs(seed, len(row_names) * len(col_names))
    out = Path(path)
    root = fmt.create_group(out)
    plate_meta: dict[str, Any] = {
        "name": out.name.split(".")[0],
        "rows": [{"name": r} for r in row_names],
        "columns": [{"name": c} for c in col_names],
        "wells": [
            {"path": f"{r}/{c}", "rowIndex": i, "columnIndex": j}
            for i, r in enumerate(row_names)
            for j, c in enumerate(col_names)
        ],
        "field_count": n_fields,
        "acquisitions": [{"id": 0, "name": "synthetic", "maximumfieldcount": n_fields}],
    }
    fmt.write_attrs(root, {"plate": fmt.plate(plate_meta)})
    truth: dict[tuple[str, int], tuple[PhenotypeCell, ...]] = {}
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i, r in enumerate(row_names):
        row_group = root.require_group(r)
        for j, c in enumerate(col_names):
            rng = well_rngs[i * len(col_names) + j]
            gains = np.exp(rng.normal(0.0, plate_effect, 2)).astype(np.float32)
            well_group = row_group.create_group(c)
            images = [{"path": str(f), "acquisition": 0} for f in range(n_fields)]
            fmt.write_attrs(well_group, {"well": fmt.well({"images": images})})
            for f in range(n_fields):
                placed = _place_cells(rng, size, n_cells, (lo, hi), gap_px=3.0)
                kinds = [PHENOTYPES[k % len(PHENOTYPES)] for k in range(len(placed))]
                kinds = [kinds[k] for k in rng.permutation(len(kinds))]
                planes = np.zeros((2, size, size), np.float32)
                for cell, kind in zip(placed, kinds, strict=True):
                    _stamp(planes, cell, kind, rng, dna=1, gfp=0)
                gx, gy = rng.uniform(-0.25, 0.25, 2)
                illumination = 1.0 + gx * (xx - 0.5) + gy * (yy - 0.5)
                for ch in range(2):
                    offset = rng.uniform(0.01, 0.05)
                    planes[ch] = planes[ch] * gains[ch] * illumination + offset
                    planes[ch] += rng.normal(0.0, 0.008, (size, size)).astype(np.float32)
                data = to_dtype(planes, np.dtype(dtype))
                write_multiscale_group(
                    well_group.create_group(str(f)),
                    area_pyramid(data, 2, y_axis=1),
                    version=fmt.version,
                    mpp=mpp,
                    channel_names=channel_names,
                    chunk=256,
                    name=f"{r}/{c}/{f}",
                )
                truth[(f"{r}{c}", f)] = tuple(
                    PhenotypeCell(x, y, kind, 2.0 * q)
                    for (x, y, q), kind in zip(placed, kinds, strict=True)
                )
    return PhenotypePlate(
        path=out,
        rows=row_names,
        columns=col_names,
        fields_per_well=n_fields,
        channel_names=channel_names,
        mpp=mpp,
        field_size=size,
        cells=truth,
    )
