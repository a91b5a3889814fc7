"""OME-Zarr high-content-screening plates: plate -> well -> field, walked from the metadata.

ome-zarr-py's ``Reader`` stitches only the first field of each well into a plate view; here every
field of every well is an image of its own, with its row, column and field index.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simsearch_wsi.core.errors import ImageNotFoundError, PlateError
from simsearch_wsi.io.base import ImageSource, Modality
from simsearch_wsi.io.omezarr import ngff_attrs_kind, open_zarr_group


@dataclass(frozen=True)
class PlateField:
    """One field (image) of one well."""

    plate_path: Path
    row: str
    column: str
    row_index: int
    column_index: int
    field_index: int
    path: Path
    acquisition: int | None = None

    @property
    def well(self) -> str:
        """Well name as ``A1`` (row name + column name)."""
        return f"{self.row}{self.column}"

    @property
    def image_id(self) -> str:
        """A name unique within the plate: ``A1_f0``."""
        return f"{self.well}_f{self.field_index}"

    def open(self, *, mpp: float | None = None, modality: Modality | None = None) -> ImageSource:
        """Open this field's image (see :func:`simsearch_wsi.io.open_image`)."""
        from simsearch_wsi.io.open import open_image

        return open_image(self.path, mpp=mpp, modality=modality)


@dataclass(frozen=True)
class Well:
    row: str
    column: str
    row_index: int
    column_index: int
    path: str
    fields: tuple[PlateField, ...]

    @property
    def name(self) -> str:
        return f"{self.row}{self.column}"


@dataclass(frozen=True)
class Plate:
    """An HCS plate's layout. Fields are opened lazily with :meth:`PlateField.open`."""

    path: Path
    name: str
    version: str
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    wells: tuple[Well, ...]

    def fields(self) -> Iterator[PlateField]:
        """Every field of every well, in plate order (row-major, then field index)."""
        for well in self.wells:
            yield from well.fields

    @property
    def n_fields(self) -> int:
        return sum(len(w.fields) for w in self.wells)

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": f"ome-zarr-plate-{self.version}",
            "name": self.name,
            "rows": list(self.rows),
            "columns": list(self.columns),
            "n_wells": len(self.wells),
            "n_fields": self.n_fields,
            "wells": [
                {
                    "well": w.name,
                    "path": w.path,
                    "fields": [f.field_index for f in w.fields],
                    # what commands take as one image: <plate>/<row>/<column>/<field>
                    "field_paths": [str(f.path) for f in w.fields],
                }
                for w in self.wells
            ],
        }


def is_plate(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is an OME-Zarr group carrying ``plate`` metadata."""
    p = Path(path)
    if not p.is_dir():
        return False
    try:
        return ngff_attrs_kind(dict(open_zarr_group(p).attrs)) == "plate"
    except Exception:
        return False


def _ngff(attrs: dict[str, Any]) -> dict[str, Any]:
    ome = attrs.get("ome")
    return ome if isinstance(ome, dict) else attrs


def open_plate(path: str | os.PathLike[str]) -> Plate:
    """Read an OME-Zarr HCS plate's layout (NGFF 0.1-0.5), every well and every field.

    Raises
    ------
    ImageNotFoundError
        the path does not exist.
    PlateError
        the group is not a plate, or a listed well or field is missing or malformed.
    """
    p = Path(path)
    if not p.exists():
        raise ImageNotFoundError(f"{p}: no such plate folder; check the path")
    group = open_zarr_group(p)
    ngff = _ngff(dict(group.attrs))
    plate = ngff.get("plate")
    if not isinstance(plate, dict):
        raise PlateError(
            f"{p}: Zarr group has no OME-Zarr 'plate' metadata; for a single image use open_image"
        )
    version = str(plate.get("version", ngff.get("version", "")))
    rows = tuple(str(r["name"]) for r in plate.get("rows", []))
    columns = tuple(str(c["name"]) for c in plate.get("columns", []))
    wells_meta = plate.get("wells")
    if not rows or not columns or not isinstance(wells_meta, list):
        raise PlateError(f"{p}: plate metadata needs 'rows', 'columns' and 'wells'")
    wells: list[Well] = []
    for wm in wells_meta:
        well_path = str(wm.get("path", ""))
        parts = well_path.split("/")
        if len(parts) != 2:
            raise PlateError(f"{p}: well path {well_path!r} is not '<row>/<column>'")
        row_index = int(wm.get("rowIndex", rows.index(parts[0]) if parts[0] in rows else -1))
        col_index = int(
            wm.get("columnIndex", columns.index(parts[1]) if parts[1] in columns else -1)
        )
        if not (0 <= row_index < len(rows) and 0 <= col_index < len(columns)):
            raise PlateError(f"{p}: well {well_path!r} has no matching row/column in the plate")
        if well_path not in group:
            raise PlateError(f"{p}: well {well_path!r} is listed in the plate but missing")
        well_group = group[well_path]
        well_meta = _ngff(dict(well_group.attrs)).get("well")
        if not isinstance(well_meta, dict) or not isinstance(well_meta.get("images"), list):
            raise PlateError(f"{p / well_path}: well group has no 'well.images' metadata")
        fields = []
        for i, im in enumerate(well_meta["images"]):
            field_path = str(im.get("path", ""))
            if field_path not in well_group:
                raise PlateError(
                    f"{p / well_path}: field {field_path!r} is listed in the well but missing"
                )
            acq = im.get("acquisition")
            fields.append(
                PlateField(
                    plate_path=p,
                    row=rows[row_index],
                    column=columns[col_index],
                    row_index=row_index,
                    column_index=col_index,
                    field_index=i,
                    path=p / well_path / field_path,
                    acquisition=int(acq) if acq is not None else None,
                )
            )
        wells.append(
            Well(
                row=rows[row_index],
                column=columns[col_index],
                row_index=row_index,
                column_index=col_index,
                path=well_path,
                fields=tuple(fields),
            )
        )
    wells.sort(key=lambda w: (w.row_index, w.column_index))
    return Plate(
        path=p,
        name=str(plate.get("name", p.stem)),
        version=version,
        rows=rows,
        columns=columns,
        wells=tuple(wells),
    )
