"""Ground truth of one image in simple open forms: CSV tables, QuPath GeoJSON, label masks.

Every reader returns a :class:`GroundTruth`: per class, the object centres and (where known)
bounding boxes in level-0 pixels (``_l0``: origin top-left, x right, y down), and optionally a
label mask for segmentation scores. Detection scores (:mod:`simsearch_wsi.eval.metrics`) use
the centres only.

Readers
-------
:func:`read_truth_csv`
    a table with a ``class`` (or ``class_name``) column and either points (``x, y``) or boxes
    (``x, y, width, height``); also the table :meth:`SyntheticSlide.to_csv` writes.
:func:`read_truth_geojson`
    classified QuPath objects (annotations, detections, cells, ...): shapes give their bounding
    box and centroid, points give points.
:func:`read_truth_mask`
    a label image (PNG, TIFF, ``.npy`` or an OME-Zarr label array): each connected component of
    label ``k`` is one object of ``classes[k - 1]``.
:func:`truth_from_synthetic`
    the objects of a :class:`~simsearch_wsi.synthetic.SyntheticSlide`.
:func:`read_truth`
    any of the file readers, chosen by the file's suffix.

Class order is the order of first appearance in the file (the given order for masks and
synthetic slides), so the same file always gives the same result.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.core.tables import csv_errors

if TYPE_CHECKING:
    from simsearch_wsi.synthetic import SyntheticSlide

__all__ = [
    "CSV_SUFFIXES",
    "GEOJSON_SUFFIXES",
    "MASK_SUFFIXES",
    "GroundTruth",
    "pixel_span_of_box",
    "read_truth",
    "read_truth_csv",
    "read_truth_geojson",
    "read_truth_mask",
    "truth_from_label_array",
    "truth_from_synthetic",
]

#: suffixes (lowercase) :func:`read_truth` reads as a table, as QuPath GeoJSON, as a label image
CSV_SUFFIXES: tuple[str, ...] = (".csv", ".tsv")
GEOJSON_SUFFIXES: tuple[str, ...] = (".geojson", ".json")
MASK_SUFFIXES: tuple[str, ...] = (".png", ".tif", ".tiff", ".npy", ".zarr")

_EMPTY_XY = np.zeros((0, 2), dtype=np.float64)
_EMPTY_BOX = np.zeros((0, 4), dtype=np.float64)


def _frozen(a: NDArray[Any]) -> NDArray[Any]:
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False, repr=False)
class GroundTruth:
    """True objects of one image, per class, in level-0 pixels.

    Attributes
    ----------
    class_names
        The classes, unique non-empty names, in a fixed order.
    centres_l0
        Class name -> float64 (n, 2) array of object centres ``x, y`` in level-0 pixels; one
        entry per name of :attr:`class_names` (possibly (0, 2)).
    boxes_l0
        Class name -> float64 (n, 4) array ``x, y, width, height`` (top-left corner and size,
        level-0 pixels), row ``i`` the box of centre ``i``; a row of NaN where only the point
        is known.
    mask
        Optional (H, W) integer label image for segmentation truth: 0 = none, ``k`` =
        ``mask_classes[k - 1]``.
    mask_classes
        The classes of the mask's labels 1, 2, ... (empty without a mask).
    mask_downsample
        ``(x, y)`` level-0 pixels per mask pixel; mask pixel ``(i, j)`` covers level-0
        ``[j * ds_x, (j + 1) * ds_x) x [i * ds_y, (i + 1) * ds_y)``, as in
        :func:`simsearch_wsi.eval.thresholded.rasterize_objects`.
    source
        Where the truth came from (a path), for messages.

    The arrays are read-only. Build one from plain centres with :meth:`from_centres`.
    """

    class_names: tuple[str, ...]
    centres_l0: dict[str, NDArray[np.float64]]
    boxes_l0: dict[str, NDArray[np.float64]]
    mask: NDArray[np.integer[Any]] | None = None
    mask_classes: tuple[str, ...] = ()
    mask_downsample: tuple[float, float] = (1.0, 1.0)
    source: str = ""

    def __post_init__(self) -> None:
        where = self.source or "ground truth"
        names = tuple(self.class_names)
        for name in names:
            if not (isinstance(name, str) and name):
                raise ConfigError(f"{where}: class names must be non-empty strings, got {name!r}")
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: class names repeat: {list(names)}")
        for label, table in (("centres_l0", self.centres_l0), ("boxes_l0", self.boxes_l0)):
            if set(table) != set(names):
                raise ConfigError(
                    f"{where}: {label} has classes {sorted(table)} but class_names are "
                    f"{sorted(names)}; give one array per class"
                )
        centres: dict[str, NDArray[np.float64]] = {}
        boxes: dict[str, NDArray[np.float64]] = {}
        for name in names:
            c = np.array(self.centres_l0[name], dtype=np.float64)
            b = np.array(self.boxes_l0[name], dtype=np.float64)
            c = c.reshape(0, 2) if c.size == 0 else c
            b = b.reshape(0, 4) if b.size == 0 else b
            if c.ndim != 2 or c.shape[1] != 2:
                raise ConfigError(f"{where}: centres of {name!r} must be (n, 2), got {c.shape}")
            if b.shape != (len(c), 4):
                raise ConfigError(
                    f"{where}: boxes of {name!r} must be ({len(c)}, 4) like its centres, "
                    f"got {b.shape}"
                )
            if not np.isfinite(c).all():
                raise ConfigError(f"{where}: class {name!r} has non-finite centres")
            centres[name] = _frozen(c)
            boxes[name] = _frozen(b)
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "centres_l0", centres)
        object.__setattr__(self, "boxes_l0", boxes)
        ds = tuple(float(v) for v in self.mask_downsample)
        if len(ds) != 2 or not all(math.isfinite(v) and v > 0 for v in ds):
            raise ConfigError(
                f"{where}: mask_downsample must be two finite numbers > 0, got "
                f"{self.mask_downsample!r}"
            )
        object.__setattr__(self, "mask_downsample", (ds[0], ds[1]))
        object.__setattr__(self, "mask_classes", tuple(self.mask_classes))
        if self.mask is not None:
            object.__setattr__(
                self, "mask", _frozen(_check_label_array(self.mask, self.mask_classes, where))
            )
        elif self.mask_classes:
            raise ConfigError(f"{where}: mask_classes given without a mask")

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_centres(
        cls,
        centres_l0: Mapping[str, ArrayLike],
        *,
        boxes_l0: Mapping[str, ArrayLike] | None = None,
        classes: Sequence[str] | None = None,
        source: str = "",
    ) -> GroundTruth:
        """Truth from plain arrays: ``centres_l0[name]`` (n, 2) ``x, y``; ``boxes_l0[name]``
        (n, 4) ``x, y, width, height`` (NaN rows where unknown; default all NaN). ``classes``
        sets the class order (and adds classes without objects); default the mapping's order.
        """
        names = tuple(centres_l0) if classes is None else tuple(classes)
        extra = set(centres_l0) - set(names)
        if extra:
            raise ConfigError(
                f"{source or 'ground truth'}: centres given for classes {sorted(extra)} that "
                "are not in classes; add them to classes"
            )
        centres: dict[str, NDArray[np.float64]] = {}
        boxes: dict[str, NDArray[np.float64]] = {}
        for name in names:
            c = np.array(centres_l0.get(name, _EMPTY_XY), dtype=np.float64)
            c = c.reshape(-1, 2) if c.size == 0 or c.ndim == 1 else c
            centres[name] = c
            if boxes_l0 is not None and name in boxes_l0:
                boxes[name] = np.array(boxes_l0[name], dtype=np.float64)
            else:
                boxes[name] = np.full((len(c), 4), np.nan)
        return cls(names, centres, boxes, source=source)

    @classmethod
    def from_region_mask(
        cls,
        labels: ArrayLike,
        *,
        classes: Sequence[str],
        downsample: float | tuple[float, float] = 1.0,
        source: str = "region mask",
    ) -> GroundTruth:
        """Truth that is regions only: a label mask (label ``k`` = ``classes[k - 1]``) and no
        objects, for tissue classes judged by area (:meth:`mask_fraction`) rather than by
        object centres."""
        names = tuple(classes)
        ds = _downsample_xy(downsample, source)
        empty = {n: np.zeros((0, 2)) for n in names}
        return cls(
            names,
            empty,
            {n: np.zeros((0, 4)) for n in names},
            mask=_check_label_array(labels, names, source),
            mask_classes=names,
            mask_downsample=ds,
            source=source,
        )

    # --- queries --------------------------------------------------------------------------------
    @property
    def classes(self) -> tuple[str, ...]:
        """The class names, in order (same as :attr:`class_names`)."""
        return self.class_names

    def centres(self, class_name: str) -> NDArray[np.float64]:
        """(n, 2) ``x, y`` level-0 centres of one class; (0, 2) for a class not in the truth
        (an image without objects of that class)."""
        return self.centres_l0.get(class_name, _EMPTY_XY)

    def boxes(self, class_name: str) -> NDArray[np.float64]:
        """(n, 4) ``x, y, width, height`` level-0 boxes of one class (NaN rows for points);
        (0, 4) for a class not in the truth."""
        return self.boxes_l0.get(class_name, _EMPTY_BOX)

    def n_objects(self, class_name: str | None = None) -> int:
        """Objects of one class (0 for a class not in the truth), or of all classes."""
        if class_name is None:
            return sum(len(c) for c in self.centres_l0.values())
        return len(self.centres(class_name))

    def counts(self) -> dict[str, int]:
        """Class name -> number of objects, in class order."""
        return {name: len(self.centres_l0[name]) for name in self.class_names}

    def subset(self, classes: Sequence[str]) -> GroundTruth:
        """The truth restricted to ``classes``, in that order; a class not in the truth gets no
        objects. A mask keeps the labels of the kept classes, renumbered to the new order
        (labels of dropped classes become 0)."""
        names = tuple(classes)
        centres = {n: self.centres(n) for n in names}
        boxes = {n: self.boxes(n) for n in names}
        mask = self.mask
        mask_classes: tuple[str, ...] = ()
        if mask is not None:
            mask_classes = tuple(n for n in names if n in self.mask_classes)
            lut = np.zeros(len(self.mask_classes) + 1, dtype=mask.dtype)
            for new, name in enumerate(mask_classes, start=1):
                lut[self.mask_classes.index(name) + 1] = new
            mask = lut[mask]
        return GroundTruth(
            names,
            centres,
            boxes,
            mask=mask,
            mask_classes=mask_classes,
            mask_downsample=self.mask_downsample,
            source=self.source,
        )

    def is_region_class(self, class_name: str) -> bool:
        """True for a class known only from the mask (no objects): judged by area."""
        return class_name in self.mask_classes and self.n_objects(class_name) == 0

    def mask_fraction(self, box_l0: BoxL0, class_name: str | None = None) -> float:
        """Fraction of the mask pixels whose centres lie in ``box_l0`` that carry
        ``class_name`` (any class when ``None``); 0.0 without a mask, for a class not in the
        mask, or for a box off the mask."""
        if self.mask is None or (class_name is not None and class_name not in self.mask_classes):
            return 0.0
        (i0, i1), (j0, j1) = pixel_span_of_box(box_l0, self.mask_downsample, shape=self.mask.shape)
        if i1 <= i0 or j1 <= j0:
            return 0.0
        window = self.mask[i0:i1, j0:j1]
        if class_name is None:
            return float(np.count_nonzero(window)) / window.size
        label = self.mask_classes.index(class_name) + 1
        return float(np.count_nonzero(window == label)) / window.size

    def with_box_mask(
        self, image_size_l0: tuple[int, int], downsample: float | tuple[float, float] = 4.0
    ) -> GroundTruth:
        """The same objects with a label mask of their boxes, for segmentation scores where
        the truth is boxes (synthetic slides): mask pixel ``(i, j)`` gets label ``k`` when its
        centre lies in a box of ``class_names[k - 1]`` (later classes win overlaps); the mask
        covers ``image_size_l0`` (width, height) at ``downsample`` level-0 pixels per pixel.
        Objects known only as points are left out of the mask."""
        ds_x, ds_y = _downsample_xy(downsample, self.source or "ground truth")
        w_l0, h_l0 = image_size_l0
        shape = (max(1, math.ceil(h_l0 / ds_y)), max(1, math.ceil(w_l0 / ds_x)))
        dtype = np.uint8 if len(self.class_names) < 255 else np.uint16
        mask = np.zeros(shape, dtype=dtype)
        for k, name in enumerate(self.class_names, start=1):
            for x, y, w, h in self.boxes(name):
                if not np.isfinite([x, y, w, h]).all():
                    continue
                (i0, i1), (j0, j1) = pixel_span_of_box(BoxL0(x, y, w, h), (ds_x, ds_y), shape=shape)
                mask[i0:i1, j0:j1] = k
        return GroundTruth(
            self.class_names,
            dict(self.centres_l0),
            dict(self.boxes_l0),
            mask=mask,
            mask_classes=self.class_names,
            mask_downsample=(ds_x, ds_y),
            source=self.source,
        )

    def __repr__(self) -> str:
        counts = ", ".join(f"{n}={k}" for n, k in self.counts().items())
        mask = "None" if self.mask is None else f"{self.mask.shape[0]}x{self.mask.shape[1]}"
        src = f", source={self.source!r}" if self.source else ""
        return f"GroundTruth({counts}; mask={mask}{src})"


# --- building from rows ---------------------------------------------------------------------
_Row = tuple[str, float, float, float, float, float, float]  # class, cx, cy, x, y, w, h


def _from_rows(
    rows: Iterable[_Row],
    *,
    source: str,
    classes: Sequence[str] = (),
) -> GroundTruth:
    """Group ``(class, centre x, centre y, box x, y, w, h)`` rows by class; classes in
    ``classes`` order first, then in order of first appearance."""
    per_class: dict[str, list[_Row]] = {name: [] for name in classes}
    for row in rows:
        per_class.setdefault(row[0], []).append(row)
    centres = {
        n: np.array([r[1:3] for r in rs], dtype=np.float64).reshape(-1, 2)
        for n, rs in per_class.items()
    }
    boxes = {
        n: np.array([r[3:7] for r in rs], dtype=np.float64).reshape(-1, 4)
        for n, rs in per_class.items()
    }
    return GroundTruth(tuple(per_class), centres, boxes, source=source)


def _check_file(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: {what} file not found; check the path")
    return p


def _restrict(truth: GroundTruth, classes: Sequence[str] | None) -> GroundTruth:
    return truth if classes is None else truth.subset(classes)


# --- CSV --------------------------------------------------------------------------------------
_CLASS_COLUMNS = ("class", "class_name")
_X_COLUMNS = ("x", "x_l0")
_Y_COLUMNS = ("y", "y_l0")
_W_COLUMNS = ("width", "width_l0", "w")
_H_COLUMNS = ("height", "height_l0", "h")
_CX_COLUMNS = ("center_x_l0", "centre_x_l0", "center_x", "centre_x")
_CY_COLUMNS = ("center_y_l0", "centre_y_l0", "center_y", "centre_y")


def _column(header: Sequence[str], names: Sequence[str]) -> int | None:
    for name in names:
        if name in header:
            return header.index(name)
    return None


def _number(text: str, p: Path, line: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(
            f"{p} line {line}: column {column!r} is not a number ({text!r:.40}); fix the file"
        ) from None
    if not math.isfinite(value):
        raise ConfigError(f"{p} line {line}: column {column!r} is not finite ({text!r:.40})")
    return value


def read_truth_csv(
    path: str | os.PathLike[str], *, classes: Sequence[str] | None = None
) -> GroundTruth:
    """Read ground truth from a table of objects, one row each, in level-0 pixels.

    Columns (header names are case-insensitive; other columns are ignored):

    ``class`` or ``class_name``
        the object's class (required, non-empty).
    ``x``, ``y`` (or ``x_l0``, ``y_l0``)
        with ``width`` and ``height`` (or ``width_l0``/``height_l0``/``w``/``h``): the box's
        top-left corner, centre = box centre; without them: the object's point (its centre).
        A row with empty ``width`` and ``height`` cells is a point in a table of boxes.
    ``center_x``, ``center_y`` (or ``centre_*``, ``*_l0``)
        explicit centres; they take precedence over the box centre, and may replace ``x, y``
        in a table of points.

    So the table :meth:`simsearch_wsi.synthetic.SyntheticSlide.to_csv` writes (``class, x_l0,
    y_l0, width_l0, height_l0, center_x_l0, center_y_l0``) loads as it is. The delimiter is a
    comma, or a tab for ``.tsv`` files. A header without rows is an image without objects.

    Parameters
    ----------
    path
        the table.
    classes
        keep only these classes, in this order (see :meth:`GroundTruth.subset`); default all,
        in order of first appearance.

    Raises
    ------
    ConfigError
        missing or empty file, missing columns, an empty class, a non-numeric or non-finite
        value, or a negative width or height (the message names the line).
    """
    p = _check_file(path, "ground-truth table")
    delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
    with csv_errors(p, "ground-truth table"), p.open(newline="", encoding="utf-8-sig") as fh:
        table = [row for row in csv.reader(fh, delimiter=delimiter) if any(c.strip() for c in row)]
    if not table:
        raise ConfigError(f"{p}: empty file; expected a header line such as 'class,x,y'")
    header = [h.strip().lower() for h in table[0]]
    i_class = _column(header, _CLASS_COLUMNS)
    i_x, i_y = _column(header, _X_COLUMNS), _column(header, _Y_COLUMNS)
    i_w, i_h = _column(header, _W_COLUMNS), _column(header, _H_COLUMNS)
    i_cx, i_cy = _column(header, _CX_COLUMNS), _column(header, _CY_COLUMNS)
    if i_class is None:
        raise ConfigError(
            f"{p}: no 'class' (or 'class_name') column in header {header}; add one naming each "
            "object's class"
        )
    has_box = i_w is not None or i_h is not None
    has_centre = i_cx is not None and i_cy is not None
    if (i_w is None) != (i_h is None):
        raise ConfigError(f"{p}: boxes need both 'width' and 'height' columns, header {header}")
    if (i_x is None or i_y is None) and (has_box or not has_centre):
        raise ConfigError(
            f"{p}: no 'x' and 'y' columns in header {header}; give points as 'class,x,y' or "
            "boxes as 'class,x,y,width,height' (level-0 pixels)"
        )
    names = {i: table[0][i].strip() for i in (i_x, i_y, i_w, i_h, i_cx, i_cy) if i is not None}
    rows: list[_Row] = []
    for line, raw in enumerate(table[1:], start=2):
        cells = [c.strip() for c in raw] + [""] * (len(header) - len(raw))
        name = cells[i_class]
        if not name:
            raise ConfigError(f"{p} line {line}: empty class; fill it in or delete the row")

        def num(i: int, cells: list[str] = cells, line: int = line) -> float:
            return _number(cells[i], p, line, names[i])

        box = (math.nan,) * 4
        centre: tuple[float, float] | None = None
        if i_w is not None and i_h is not None and (cells[i_w] or cells[i_h]):
            if i_x is None or i_y is None:  # pragma: no cover - excluded above
                raise ConfigError(f"{p}: boxes need 'x' and 'y' columns")
            x, y, w, h = num(i_x), num(i_y), num(i_w), num(i_h)
            if w < 0 or h < 0:
                raise ConfigError(
                    f"{p} line {line}: negative width or height ({w}, {h}); boxes are "
                    "x, y (top-left), width, height in level-0 pixels"
                )
            box = (x, y, w, h)
            centre = (x + w / 2.0, y + h / 2.0)
        elif i_x is not None and i_y is not None and (cells[i_x] or cells[i_y]):
            centre = (num(i_x), num(i_y))
        if i_cx is not None and i_cy is not None and (cells[i_cx] or cells[i_cy]):
            centre = (num(i_cx), num(i_cy))
        if centre is None:
            raise ConfigError(
                f"{p} line {line}: no position (x and y are empty); fill them in or delete the row"
            )
        rows.append((name, *centre, *box))
    return _restrict(_from_rows(rows, source=str(p)), classes)


# --- QuPath GeoJSON ---------------------------------------------------------------------------
def read_truth_geojson(
    path: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    object_types: Collection[str] | None = None,
    unclassified: Literal["skip", "error"] = "skip",
) -> GroundTruth:
    """Read ground truth from classified QuPath GeoJSON objects (any QuPath version 0.2-0.7).

    Each classified object is one true object of its class (the full QuPath class name, e.g.
    ``"Tumor: Positive"``): a ``Point`` is a point (box NaN); a ``MultiPoint`` (what QuPath's
    points tool writes) is one point per position; any other geometry (polygon, rectangle,
    line, collection) gives its bounding box and its centroid (the box centre when the centroid
    is undefined, e.g. a zero-area polygon). Geometries are read by
    :func:`simsearch_wsi.qupath.geojson.read_features`.

    Parameters
    ----------
    path
        a ``.geojson``/``.json`` file.
    classes
        keep only these classes, in this order; default all, in order of first appearance.
    object_types
        keep only objects of these QuPath types (``annotation``, ``detection``, ``cell``,
        ``tile``, ...); default all.
    unclassified
        ``"skip"`` (default): objects without a class are left out (a tissue outline, say);
        ``"error"``: raise :class:`ConfigError` on the first one.

    Raises
    ------
    ConfigError
        missing file, not QuPath GeoJSON, a malformed geometry, or an unclassified object with
        ``unclassified="error"``.
    """
    import shapely
    from shapely.geometry import MultiPoint, Point

    from simsearch_wsi.qupath.geojson import read_features

    p = _check_file(path, "ground-truth GeoJSON")
    if unclassified not in ("skip", "error"):
        raise ConfigError(f"unclassified must be 'skip' or 'error', got {unclassified!r}")
    if p.stat().st_size == 0:
        raise ConfigError(f"{p}: empty file; export the objects from QuPath as GeoJSON")
    rows: list[_Row] = []
    for n, ann in enumerate(read_features(p)):
        if object_types is not None and ann.object_type not in object_types:
            continue
        if ann.class_name is None:
            if unclassified == "error":
                raise ConfigError(
                    f"{p} feature {n}: object without a class; classify it in QuPath or read "
                    "with unclassified='skip'"
                )
            continue
        geom = ann.geometry
        b = ann.box
        if isinstance(geom, Point | MultiPoint):
            xy = shapely.get_coordinates(geom)
            rows.extend((ann.class_name, float(x), float(y), *(math.nan,) * 4) for x, y in xy)
            continue
        cx, cy = b.center_l0
        if geom is not None:
            c = geom.centroid
            if not c.is_empty and math.isfinite(c.x) and math.isfinite(c.y):
                cx, cy = float(c.x), float(c.y)
        rows.append((ann.class_name, cx, cy, b.x_l0, b.y_l0, b.width_l0, b.height_l0))
    return _restrict(_from_rows(rows, source=str(p)), classes)


# --- label masks ------------------------------------------------------------------------------
def _check_label_array(arr: Any, classes: Sequence[str], where: str) -> NDArray[np.integer[Any]]:
    """A 2-D integer label array with labels in 0..len(classes); leading size-1 axes dropped."""
    a = np.asarray(arr)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ConfigError(
            f"{where}: a label mask must be one 2-D channel, got shape {a.shape}; save the "
            "labels as a single-channel integer image"
        )
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    elif a.dtype.kind == "f":
        if not (np.isfinite(a).all() and (a == np.round(a)).all()):
            raise ConfigError(f"{where}: label mask has non-integer values; save integer labels")
        a = a.astype(np.int64)
    elif a.dtype.kind not in "iu":
        raise ConfigError(f"{where}: label mask has dtype {a.dtype}; save integer labels")
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > len(classes):
            raise ConfigError(
                f"{where}: labels range {lo}..{hi} but {len(classes)} classes were given "
                f"({', '.join(classes) or 'none'}); label k must be 0 or 1..{len(classes)}"
            )
    return a


def _load_zarr_labels(p: Path) -> NDArray[Any]:
    """Level 0 of an OME-Zarr label image, a Zarr array, or the one label image of an image."""
    import zarr

    try:
        node: Any = zarr.open(str(p), mode="r")
    except Exception as exc:  # zarr raises several types for "not a store"
        raise ConfigError(
            f"{p}: not a Zarr array or group ({exc}); pass a label image such as "
            "out.ome.zarr/labels/<name>"
        ) from exc
    for _ in range(4):
        if isinstance(node, zarr.Array):
            return np.asarray(node[...])
        attrs = dict(node.attrs)
        ome = attrs.get("ome")
        ngff: dict[str, Any] = ome if isinstance(ome, dict) else attrs
        ms = ngff.get("multiscales")
        if isinstance(ms, list) and ms and isinstance(ms[0], dict) and "image-label" in ngff:
            node = node[str(ms[0]["datasets"][0]["path"])]
            continue
        labels = ngff.get("labels")
        if isinstance(labels, list) and len(labels) == 1:
            node = node[str(labels[0])]
            continue
        if "labels" in node and not isinstance(labels, list):
            node = node["labels"]
            continue
        break
    raise ConfigError(
        f"{p}: no single OME-Zarr label image found; pass the label image folder itself, e.g. "
        "out.ome.zarr/labels/<name>"
    )


def _load_label_image(p: Path) -> NDArray[Any]:
    suffix = p.suffix.lower()
    if p.is_dir() or suffix == ".zarr":
        return _load_zarr_labels(p)
    if suffix == ".npy":
        try:
            return np.asarray(np.load(p, allow_pickle=False))
        except ValueError as exc:
            raise ConfigError(f"{p}: not a numeric .npy array ({exc})") from exc
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            return np.asarray(tifffile.imread(p, level=0))
        except (tifffile.TiffFileError, ValueError) as exc:
            raise ConfigError(f"{p}: cannot read the TIFF label mask ({exc})") from exc
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            return np.asarray(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(f"{p}: cannot read the label mask image ({exc})") from exc


def pixel_span_of_box(
    box_l0: BoxL0, downsample: tuple[float, float], *, shape: tuple[int, ...]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((i0, i1), (j0, j1)): the rows and columns of a mask of ``shape`` (H, W) at
    ``downsample`` (x, y) whose pixel centres lie in ``box_l0``: pixel j's centre
    ``(j + 0.5) * ds`` lies in ``[x, x + w)`` <=> ``j in [x / ds - 0.5, (x + w) / ds - 0.5)``."""
    ds_x, ds_y = downsample
    j0 = max(0, math.ceil(box_l0.x_l0 / ds_x - 0.5))
    i0 = max(0, math.ceil(box_l0.y_l0 / ds_y - 0.5))
    j1 = min(shape[1], math.ceil(box_l0.x1_l0 / ds_x - 0.5))
    i1 = min(shape[0], math.ceil(box_l0.y1_l0 / ds_y - 0.5))
    return (i0, i1), (j0, j1)


def _downsample_xy(downsample: float | tuple[float, float], where: str) -> tuple[float, float]:
    ds = (downsample, downsample) if isinstance(downsample, int | float) else tuple(downsample)
    if len(ds) != 2 or not all(math.isfinite(float(v)) and float(v) > 0 for v in ds):
        raise ConfigError(
            f"{where}: downsample must be a finite number > 0 or an (x, y) pair of them, got "
            f"{downsample!r}"
        )
    return (float(ds[0]), float(ds[1]))


def truth_from_label_array(
    labels: ArrayLike,
    *,
    classes: Sequence[str],
    downsample: float | tuple[float, float] = 1.0,
    connectivity: Literal[1, 2] = 2,
    min_pixels: int = 1,
    source: str = "label mask",
) -> GroundTruth:
    """Ground truth from an in-memory label mask; see :func:`read_truth_mask`."""
    names = tuple(classes)
    if not names:
        raise ConfigError(f"{source}: give the classes of labels 1, 2, ... (classes=[...])")
    if connectivity not in (1, 2):
        raise ConfigError(f"connectivity must be 1 (4-neighbours) or 2 (8), got {connectivity!r}")
    if min_pixels < 1:
        raise ConfigError(f"min_pixels must be >= 1, got {min_pixels}")
    ds_x, ds_y = _downsample_xy(downsample, source)
    mask = _check_label_array(labels, names, source)
    structure = ndimage.generate_binary_structure(2, connectivity)
    centres: dict[str, NDArray[np.float64]] = {}
    boxes: dict[str, NDArray[np.float64]] = {}
    for k, name in enumerate(names, start=1):
        binary = mask == k
        comp, n = ndimage.label(binary, structure=structure)
        cs: list[tuple[float, float]] = []
        bs: list[tuple[float, float, float, float]] = []
        if n:
            index = np.arange(1, n + 1)
            sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
            com = ndimage.center_of_mass(binary, comp, index)
            for sl, (ci, cj), size in zip(ndimage.find_objects(comp), com, sizes, strict=True):
                if size < min_pixels or sl is None:
                    continue
                rows, cols = sl
                cs.append(((cj + 0.5) * ds_x, (ci + 0.5) * ds_y))
                bs.append(
                    (
                        cols.start * ds_x,
                        rows.start * ds_y,
                        (cols.stop - cols.start) * ds_x,
                        (rows.stop - rows.start) * ds_y,
                    )
                )
        centres[name] = np.array(cs, dtype=np.float64).reshape(-1, 2)
        boxes[name] = np.array(bs, dtype=np.float64).reshape(-1, 4)
    return GroundTruth(
        names,
        centres,
        boxes,
        mask=mask,
        mask_classes=names,
        mask_downsample=(ds_x, ds_y),
        source=source,
    )


def read_truth_mask(
    path: str | os.PathLike[str],
    *,
    classes: Sequence[str],
    downsample: float | tuple[float, float] = 1.0,
    connectivity: Literal[1, 2] = 2,
    min_pixels: int = 1,
) -> GroundTruth:
    """Read ground truth from a label image: 0 = none, ``k`` = ``classes[k - 1]``.

    Each connected component of label ``k`` (8-connected by default) is one object: its centre
    is the mean of its pixel centres, its box the bounding box of its pixels, both scaled to
    level 0 (mask pixel ``(i, j)`` covers level-0 ``[j * ds_x, (j + 1) * ds_x)`` and its centre
    is at ``(j + 0.5) * ds_x``). Objects are in raster order of their first pixel. The mask
    itself is kept (:attr:`GroundTruth.mask`) for segmentation scores.

    Parameters
    ----------
    path
        a PNG (8/16-bit grey or palette), a TIFF (level 0 of its first series), a ``.npy``
        array, or an OME-Zarr label image folder (``out.ome.zarr/labels/<name>``, a Zarr array,
        or an image with exactly one label image); leading size-1 axes are dropped.
    classes
        the class of each label value 1, 2, ... (required).
    downsample
        level-0 pixels per mask pixel, one number or ``(x, y)``.
    connectivity
        1: pixels touching by an edge form one object; 2 (default): by an edge or a corner.
    min_pixels
        components with fewer pixels are left out (specks).

    Raises
    ------
    ConfigError
        missing or unreadable file, not a single-channel integer image, a label above
        ``len(classes)`` or below 0, no classes, a bad downsample.
    """
    p = _check_file(path, "ground-truth label mask")
    if p.is_file() and p.stat().st_size == 0:
        raise ConfigError(f"{p}: empty file; save the label mask again")
    return truth_from_label_array(
        _load_label_image(p),
        classes=classes,
        downsample=downsample,
        connectivity=connectivity,
        min_pixels=min_pixels,
        source=str(p),
    )


# --- synthetic slides and dispatch ------------------------------------------------------------
def truth_from_synthetic(slide: SyntheticSlide) -> GroundTruth:
    """The stamped objects of a synthetic slide: box centres and boxes, classes in
    ``slide.classes`` order (a class without objects is kept, with none)."""
    rows: list[_Row] = [
        (o.class_name, *o.center_l0, o.x_l0, o.y_l0, o.width_l0, o.height_l0) for o in slide.objects
    ]
    return _from_rows(rows, source=str(slide.path), classes=slide.classes)


def read_truth(
    path: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    downsample: float | tuple[float, float] = 1.0,
) -> GroundTruth:
    """Read ground truth with the reader for the file's suffix.

    ``.csv``/``.tsv``: :func:`read_truth_csv`; ``.geojson``/``.json``:
    :func:`read_truth_geojson`; ``.png``/``.tif``/``.tiff``/``.npy``/``.zarr`` or a folder:
    :func:`read_truth_mask` (needs ``classes``, the class of each label value 1, 2, ...; uses
    ``downsample``). For tables and GeoJSON, ``classes`` keeps only those classes, in order.

    Raises
    ------
    ConfigError
        an unknown suffix, a mask without ``classes``, or what the chosen reader raises.
    """
    p = _check_file(path, "ground-truth")
    suffix = p.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return read_truth_csv(p, classes=classes)
    if suffix in GEOJSON_SUFFIXES:
        return read_truth_geojson(p, classes=classes)
    if suffix in MASK_SUFFIXES or p.is_dir():
        if classes is None:
            raise ConfigError(
                f"{p}: a label mask needs the class of each label value; pass classes=[...] "
                "(label 1 = first class)"
            )
        return read_truth_mask(p, classes=classes, downsample=downsample)
    known = ", ".join(CSV_SUFFIXES + GEOJSON_SUFFIXES + MASK_SUFFIXES)
    raise ConfigError(
        f"{p}: unknown ground-truth format {suffix or '(no suffix)'!r}; use one of {known}"
    )
