"""A synthetic OME-Zarr HCS plate (NGFF 0.4) whose fraction of reporter-positive cells rises
across columns, like a dose response (:func:`make_synthetic_plate`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from simsearch_wsi.core.checks import check_positive_int
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import validate_mpp
from simsearch_wsi.io.ngff import ngff_format
from simsearch_wsi.io.omezarr_writer import write_multiscale_group
from simsearch_wsi.io.pyramid import area_pyramid
from simsearch_wsi.synthetic._cells import background_planes, cell_grid, stamp_cell, to_dtype
from simsearch_wsi.synthetic._common import child_rngs
from simsearch_wsi.synthetic.truth import SyntheticPlate, WellTruth

__all__ = ["make_synthetic_plate"]

# plates are written in this NGFF version only
_PLATE_FORMAT = ngff_format("0.4")


def _dose_fractions(n_columns: int) -> list[float]:
    """Target reporter-positive fraction per column, increasing from 0.1 to 0.9."""
    if n_columns == 1:
        return [0.5]
    return [0.1 + 0.8 * j / (n_columns - 1) for j in range(n_columns)]


def make_synthetic_plate(
    path: str | Path,
    *,
    rows: Sequence[str] = ("A", "B"),
    columns: Sequence[str] = ("1", "2", "3"),
    fields_per_well: int = 2,
    field_size: int = 256,
    channels: Sequence[str] = ("DAPI", "GFP"),
    mpp: float = 0.65,
    seed: int = 0,
    version: Literal["0.4"] = "0.4",
) -> SyntheticPlate:
    """Write an OME-Zarr HCS plate (NGFF 0.4, Zarr v2, Blosc-LZ4) with a dose response.

    Layout: plate group (``plate`` metadata: rows, columns, wells ``"A/1"`` with
    rowIndex/columnIndex, field_count, one acquisition) -> row groups -> well groups (``well``
    metadata listing fields ``"0"``, ``"1"``, ...) -> field images (c, y, x, uint16, 2 levels,
    written like :func:`~simsearch_wsi.io.omezarr_writer.write_ome_zarr_image`).

    Every field is covered by cells (nuclei in ``channels[0]``); a fraction of them carry a
    nuclear reporter in ``channels[1]``. The target fraction rises linearly from 0.1 in the
    first column to 0.9 in the last (0.5 for one column); each field gets exactly
    ``round(target * n_cells)`` positives, and the realised fraction is the ground truth.
    """
    fmt = _PLATE_FORMAT
    if version != fmt.version:
        raise ConfigError(
            f"plates are written as OME-Zarr {fmt.version} only, got version {version!r}"
        )
    row_names = (rows,) if isinstance(rows, str) else tuple(rows)
    col_names = (columns,) if isinstance(columns, str) else tuple(columns)
    for kind, names in (("row", row_names), ("column", col_names)):
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"plate {kind} names must be non-empty and unique, got {names}")
        for n in names:
            if not n or not n.isascii() or not n.isalnum():
                raise ConfigError(f"plate {kind} name {n!r} must be ASCII letters/digits only")
    n_fields = check_positive_int("fields_per_well", fields_per_well)
    size = check_positive_int("field_size", field_size, minimum=32)
    channel_names = (channels,) if isinstance(channels, str) else tuple(channels)
    if len(channel_names) < 2 or len(set(channel_names)) != len(channel_names):
        raise ConfigError(
            f"channels must be at least 2 distinct names (nuclei, reporter, ...), got "
            f"{channel_names}"
        )
    mpp = validate_mpp(mpp, source="make_synthetic_plate")
    child_rngs(seed, 1)  # validates the seed
    out = Path(path)
    root = fmt.create_group(out)
    plate_meta = {
        "name": out.name,
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
    targets = _dose_fractions(len(col_names))
    r_nuc, r_cell = 5.0, 9.0
    pitch = 2.0 * r_cell + 4.0
    n_levels = 2
    seq = np.random.SeedSequence(int(seed))
    well_seqs = seq.spawn(len(row_names) * len(col_names))
    wells: dict[str, WellTruth] = {}
    for i, r in enumerate(row_names):
        row_group = root.require_group(r)
        for j, c in enumerate(col_names):
            well_group = row_group.create_group(c)
            images = [{"path": str(f), "acquisition": 0} for f in range(n_fields)]
            fmt.write_attrs(well_group, {"well": fmt.well({"images": images})})
            field_rngs = [
                np.random.default_rng(s) for s in well_seqs[i * len(col_names) + j].spawn(n_fields)
            ]
            cells_per_field: list[tuple[tuple[float, float, bool], ...]] = []
            for f, rng in enumerate(field_rngs):
                pts = cell_grid(rng, (size, size), pitch=pitch, margin=r_cell)
                n_pos = round(targets[j] * len(pts))
                positive = np.zeros(len(pts), dtype=bool)
                positive[rng.permutation(len(pts))[:n_pos]] = True
                planes = background_planes(rng, (len(channel_names), size, size), level=0.01)
                for (cx, cy), pos in zip(pts.tolist(), positive.tolist(), strict=True):
                    stamp_cell(
                        planes,
                        (cx, cy),
                        r_nuc=r_nuc,
                        r_cell=r_cell,
                        rng=rng,
                        reporter="nuclear" if pos else "none",
                    )
                data = to_dtype(planes, np.dtype(np.uint16))
                write_multiscale_group(
                    well_group.create_group(str(f)),
                    area_pyramid(data, n_levels, y_axis=1),
                    version=fmt.version,
                    mpp=mpp,
                    channel_names=channel_names,
                    chunk=256,
                    name=f"{r}/{c}/{f}",
                )
                cells_per_field.append(
                    tuple(
                        (float(x), float(y), bool(p))
                        for (x, y), p in zip(pts.tolist(), positive.tolist(), strict=True)
                    )
                )
            n_cells = sum(len(cf) for cf in cells_per_field)
            n_positive = sum(p for cf in cells_per_field for _, _, p in cf)
            wells[f"{r}/{c}"] = WellTruth(
                row=r,
                column=c,
                gfp_positive_fraction=n_positive / n_cells if n_cells else 0.0,
                n_cells=n_cells,
                cells=tuple(cells_per_field),
            )
    return SyntheticPlate(
        path=out,
        rows=row_names,
        columns=col_names,
        fields_per_well=n_fields,
        wells=wells,
        channel_names=channel_names,
        mpp=mpp,
        field_size=size,
    )
