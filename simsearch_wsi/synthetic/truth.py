"""Ground truth of the synthetic images: stamped objects, slides and plate wells.

Coordinates are level-0 pixels (``_l0``), origin top-left, x right, y down.
"""

from __future__ import annotations

import csv
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.qupath.geojson import class_color

__all__ = ["CLASS_COLORS", "SyntheticObject", "SyntheticPlate", "SyntheticSlide", "WellTruth"]

# QuPath class colours of the synthetic classes (from the one palette in qupath_geojson).
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    name: class_color(name)
    for name in ("ring", "cluster", "stripes", "nuclear_gfp", "cytoplasmic_gfp")
}

_GEOJSON_STREAM = 0x6E0  # child stream of the seed used for deterministic feature ids
_BACKGROUND_STREAM = 0xB6  # child stream for background boxes


@dataclass(frozen=True)
class SyntheticObject:
    """One stamped motif: its class and its bounding box in level-0 pixels."""

    class_name: str
    x_l0: float
    y_l0: float
    width_l0: float
    height_l0: float

    @property
    def center_l0(self) -> tuple[float, float]:
        """(x, y) of the box centre in level-0 pixels."""
        return (self.x_l0 + self.width_l0 / 2.0, self.y_l0 + self.height_l0 / 2.0)

    @property
    def box(self) -> BoxL0:
        """The bounding box as a :class:`~simsearch_wsi.core.geometry.BoxL0`."""
        return BoxL0(self.x_l0, self.y_l0, self.width_l0, self.height_l0)


@dataclass(eq=False)
class SyntheticSlide:
    """A synthetic image on disk and its ground truth.

    Attributes
    ----------
    path
        the written file (TIFF) or folder (OME-Zarr).
    objects
        the stamped motifs, boxes in level-0 pixels.
    classes
        the class names requested, in order.
    mpp
        level-0 pixel size in micrometres per pixel.
    width, height
        level-0 size in pixels.
    tissue_mask
        bool (height, width) array at **level 0** (``tissue_mask_downsample == 1``): True where
        the pixel belongs to tissue (blend weight of the tissue layer >= 0.5).
    seed
        the seed the slide was made with (also seeds the GeoJSON feature ids).
    channel_names
        channel labels as written to the file's metadata.
    n_levels
        number of pyramid levels written.
    format
        ``tiff``, ``ome-tiff``, ``ome-zarr-0.4`` or ``ome-zarr-0.5``.
    """

    path: Path
    objects: tuple[SyntheticObject, ...]
    classes: tuple[str, ...]
    mpp: float
    width: int
    height: int
    tissue_mask: NDArray[np.bool_]
    seed: int = 0
    channel_names: tuple[str, ...] = ("R", "G", "B")
    n_levels: int = 1
    format: str = "tiff"
    tissue_mask_downsample: int = field(default=1)

    def objects_of(self, class_name: str) -> tuple[SyntheticObject, ...]:
        """The objects of one class, in placement order (empty for an unknown class)."""
        return tuple(o for o in self.objects if o.class_name == class_name)

    def background_boxes(self, n: int, *, seed: int, size_l0: float = 48.0) -> list[BoxL0]:
        """``n`` seeded square boxes of ``size_l0`` px at least half a box away from every
        motif (background examples for training and evaluation)."""
        rng = np.random.default_rng([seed, _BACKGROUND_STREAM])
        margin = size_l0 / 2.0
        near = [
            BoxL0(
                o.x_l0 - margin, o.y_l0 - margin, o.width_l0 + 2 * margin, o.height_l0 + 2 * margin
            )
            for o in self.objects
        ]
        out: list[BoxL0] = []
        for _ in range(1000 * max(n, 1)):
            if len(out) == n:
                return out
            x, y = rng.uniform(0, self.width - size_l0), rng.uniform(0, self.height - size_l0)
            box = BoxL0(float(x), float(y), size_l0, size_l0)
            if not any(box.intersects(b) for b in near):
                out.append(box)
        raise ConfigError(f"{self.path}: could not place {n} background boxes away from motifs")

    def to_geojson(self, path: str | Path | None = None) -> dict[str, Any]:
        """The objects as a QuPath-style GeoJSON FeatureCollection of rectangle annotations.

        Coordinates are level-0 pixels. Feature ids are version-4 UUIDs drawn from a child
        stream of :attr:`seed`, so the output is reproducible. When ``path`` is given the
        collection is also written there as JSON.
        """
        from simsearch_wsi.qupath.geojson import (
            box_feature,
            feature_collection,
            write_feature_collection,
        )

        rng = np.random.default_rng([self.seed, _GEOJSON_STREAM])
        features = [
            box_feature(
                obj.box,
                class_name=obj.class_name,
                object_type="annotation",
                id=str(uuid.UUID(bytes=rng.bytes(16), version=4)),
            )
            for obj in self.objects
        ]
        if path is not None:
            write_feature_collection(path, features)
        return feature_collection(features)

    def to_csv(self, path: str | Path) -> Path:
        """Write one row per object: class, box (x, y, w, h) and centre, in level-0 pixels."""
        out = Path(path)
        with out.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(
                ["class", "x_l0", "y_l0", "width_l0", "height_l0", "center_x_l0", "center_y_l0"]
            )
            for o in self.objects:
                cx, cy = o.center_l0
                writer.writerow([o.class_name, o.x_l0, o.y_l0, o.width_l0, o.height_l0, cx, cy])
        return out


@dataclass(frozen=True)
class WellTruth:
    """Ground truth of one plate well.

    ``cells[f]`` lists the cells of field ``f`` as ``(x_l0, y_l0, is_positive)``: nucleus centre
    in level-0 pixels of that field's image, and whether its nucleus carries the reporter.
    ``gfp_positive_fraction`` is the realised fraction of positive cells over all fields.
    """

    row: str
    column: str
    gfp_positive_fraction: float
    n_cells: int
    cells: tuple[tuple[tuple[float, float, bool], ...], ...]


@dataclass(frozen=True)
class SyntheticPlate:
    """An OME-Zarr HCS plate on disk and its per-well ground truth (keys ``"A/1"``, ...)."""

    path: Path
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    fields_per_well: int
    wells: dict[str, WellTruth]
    channel_names: tuple[str, ...] = ("DAPI", "GFP")
    mpp: float = 0.65
    field_size: int = 256
