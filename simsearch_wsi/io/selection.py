"""Which images a command runs on (issue 30): image files and OME-Zarr images as given, plate
fields given by path (``plate.ome.zarr/A/1/0``: row, column, field), and whole plates, every
field or the ones ``wells`` and ``fields`` select.

Every image gets an output stem (``<name>`` for an image file, ``<plate>_<well>_f<field>``
for a plate field, however it was given) and, for plate fields, the table columns ``plate``,
``well``, ``row``, ``column`` and ``field``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simsearch_wsi.core.errors import ConfigError, ImageNotFoundError
from simsearch_wsi.io.plate import Plate, PlateField, is_plate, open_plate

__all__ = [
    "ImageInput",
    "expand_images",
    "field_of",
    "image_stem",
    "parse_fields",
    "parse_wells",
    "select_fields",
]

_IMAGE_SUFFIXES = (".ome.zarr", ".ome.tiff", ".ome.tif", ".zarr", ".tiff", ".tif", ".svs")


@dataclass(frozen=True)
class ImageInput:
    """One image of a command: its path, output stem, table columns (plate fields: plate,
    well, row, column, field) and, for a plate field, the plate folder."""

    path: str
    stem: str
    extra: dict[str, Any] = field(default_factory=dict)
    plate: str | None = None


def image_stem(path: str | os.PathLike[str]) -> str:
    """Output file stem of an image: its name without image suffixes."""
    name = Path(path).name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def parse_wells(text: str | None, *, option: str = "--wells") -> tuple[str, ...] | None:
    """``--wells A1,B12`` as well names (``A/1`` and ``A01`` are accepted too); ``None`` or
    empty: every well. ``option`` names where the user gave them, for messages."""
    if text is None or not text.strip():
        return None
    names = tuple(w.strip().replace("/", "") for w in text.split(",") if w.strip())
    for name in names:
        if not name.isascii() or not name.isalnum() or not any(ch.isdigit() for ch in name):
            raise ConfigError(
                f"{option} {text!r}: {name!r} is not a well name; give wells as row letter and "
                "column number, e.g. A1,B12"
            )
    return names


def parse_fields(text: str | None, *, option: str = "--fields") -> tuple[int, ...] | None:
    """``--fields 0,1`` as field indices (0 = the well's first field); ``None`` or empty: every
    field. ``option`` names where the user gave them, for messages."""
    if text is None or not text.strip():
        return None
    try:
        out = tuple(int(f) for f in text.split(",") if f.strip())
    except ValueError:
        raise ConfigError(
            f"{option} {text!r}: give field indices, comma-separated, e.g. 0,1"
        ) from None
    if any(f < 0 for f in out):
        raise ConfigError(f"{option} {text!r}: field indices start at 0")
    return out


def _well_key(name: str) -> tuple[str, str]:
    """(row, column) of a well name with the column's leading zeros dropped: ``A01`` -> A, 1."""
    i = len(name)
    while i > 0 and name[i - 1].isdigit():
        i -= 1
    row, column = name[:i], name[i:]
    return row.upper(), column.lstrip("0") or "0"


def select_fields(
    plate: Plate,
    *,
    wells: Sequence[str] | None = None,
    fields: Sequence[int] | None = None,
) -> list[PlateField]:
    """The plate's fields in the ``wells`` (names like ``A1``; ``None``: every well) with the
    ``fields`` indices (``None``: every field), in plate order. Raises :class:`ConfigError`
    naming what the plate has when a well or field is not there."""
    by_key = {_well_key(w.name): w for w in plate.wells}
    chosen = plate.wells
    if wells is not None:
        missing = [w for w in wells if _well_key(w) not in by_key]
        if missing:
            have = ", ".join(w.name for w in plate.wells)
            raise ConfigError(
                f"{plate.path}: no well {', '.join(missing)} in this plate; its wells are {have}"
            )
        keys = {_well_key(w) for w in wells}
        chosen = tuple(w for w in plate.wells if _well_key(w.name) in keys)
    out: list[PlateField] = []
    for well in chosen:
        if fields is None:
            out.extend(well.fields)
            continue
        have_idx = [f.field_index for f in well.fields]
        missing_idx = [f for f in fields if f not in have_idx]
        if missing_idx:
            raise ConfigError(
                f"{plate.path}: well {well.name} has fields {have_idx}, not "
                f"{', '.join(str(f) for f in missing_idx)}"
            )
        out.extend(f for f in well.fields if f.field_index in fields)
    return out


def field_of(path: str | os.PathLike[str]) -> tuple[Plate, PlateField] | None:
    """The plate and field that ``path`` (``plate.ome.zarr/A/1/0``) is, or ``None`` when it is
    not a field of a plate."""
    p = Path(path)
    if len(p.parts) < 4 or not p.is_dir():
        return None
    root = p.parent.parent.parent
    if not is_plate(root):
        return None
    plate = open_plate(root)
    target = os.path.normcase(os.path.abspath(p))
    for f in plate.fields():
        if os.path.normcase(os.path.abspath(f.path)) == target:
            return plate, f
    return None


def _field_input(plate: Plate, f: PlateField) -> ImageInput:
    extra = {
        "plate": plate.name,
        "well": f.well,
        "row": f.row,
        "column": f.column,
        "field": f.field_index,
    }
    return ImageInput(str(f.path), f"{image_stem(plate.path)}_{f.image_id}", extra, str(plate.path))


def expand_images(
    paths: Sequence[str],
    *,
    wells: Sequence[str] | None = None,
    fields: Sequence[int] | None = None,
) -> list[ImageInput]:
    """The images of a command: image files and OME-Zarr images as given, plate fields given
    by path named as plate fields, and OME-Zarr plates as their fields (``wells`` and
    ``fields`` select them; they apply to plates only).

    Raises :class:`ImageNotFoundError` for a missing path and :class:`ConfigError` when a
    selection is given without a plate, or selects nothing.
    """
    out: list[ImageInput] = []
    n_plates = 0
    for p in paths:
        if not Path(p).exists():
            raise ImageNotFoundError(f"{p}: no such file or directory; check the path")
        if is_plate(p):
            n_plates += 1
            plate = open_plate(p)
            chosen = select_fields(plate, wells=wells, fields=fields)
            if not chosen:
                raise ConfigError(f"{p}: the plate has no fields to run on")
            out.extend(_field_input(plate, f) for f in chosen)
            continue
        found = field_of(p)
        if found is not None:
            out.append(_field_input(*found))
        else:
            out.append(ImageInput(str(p), image_stem(p)))
    if n_plates == 0 and (wells is not None or fields is not None):
        raise ConfigError(
            "--wells and --fields select fields of an OME-Zarr plate; give the plate folder "
            "(a field given by path, plate.ome.zarr/A/1/0, needs no selection)"
        )
    return out
