"""IHC scoring as pathologists report it: positive %, 1+/2+/3+, H-score, cells per mm^2.

Cells come from :mod:`simsearch_wsi.infer.cells`. Each is binned by one measurement (QuPath's
"score compartment", default ``"Nucleus: DAB OD mean"``) against three thresholds (QuPath's
defaults 0.2 / 0.4 / 0.6): below the first = negative, ``>= t1`` = 1+, ``>= t2`` = 2+,
``>= t3`` = 3+. A cell is positive when its bin is >= 1+, so "positive %" is the same with one
threshold (QuPath's "single threshold" mode, classes ``Positive``/``Negative``) and with three
(classes ``1+``/``2+``/``3+``/``Negative``). H-score = 1 x %1+ + 2 x %2+ + 3 x %3+ (0..300).

Regions are the user's QuPath annotations (or TMA cores), read from GeoJSON: a cell belongs to
every region that contains its nucleus centroid (nested regions each count it). Without
annotations the region is the whole image (or, on request, its tissue foreground). Outputs:
QuPath cell objects (nucleus and cell outlines, QuPath's measurement names and classes), the
regions as annotations carrying QuPath's summary measurement names (``Num Detections``, ``Num
Positive``, ``Positive %``, ``H-score``, ...), and a CSV table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.infer.cells import (
    QUPATH_H_DAB,
    CellDetectionParams,
    CellTable,
    StainVectors,
    measurement_names,
)

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from simsearch_wsi.features.tissue import TissueMask
    from simsearch_wsi.io.base import ImageSource
    from simsearch_wsi.qupath.geojson import Annotation

__all__ = [
    "INTENSITY_CLASSES",
    "IhcResult",
    "PositivityRule",
    "Region",
    "RegionScore",
    "cell_features",
    "check_extra_columns",
    "clip_regions",
    "image_regions",
    "intensity_bins",
    "quantify_image",
    "region_features",
    "regions_from_annotations",
    "score_bins",
    "score_regions",
    "score_rows",
]

#: class names by bin (negative, 1+, 2+, 3+) in three-threshold mode, as QuPath names them
INTENSITY_CLASSES: tuple[str, ...] = ("Negative", "1+", "2+", "3+")
#: class names (negative, positive) in single-threshold mode
SINGLE_CLASSES: tuple[str, str] = ("Negative", "Positive")
# QuPath's built-in colours of these classes
_CLASS_RGB: dict[str, tuple[int, int, int]] = {
    "Negative": (112, 112, 225),
    "Positive": (200, 50, 50),
    "1+": (255, 215, 0),
    "2+": (225, 150, 50),
    "3+": (200, 50, 50),
}


@dataclass(frozen=True)
class PositivityRule:
    """How cells are classified.

    Attributes
    ----------
    compartment
        The measurement compared with the thresholds (QuPath's "Score compartment").
    thresholds
        Three increasing OD thresholds (1+, 2+, 3+); the first is the positivity threshold.
    single_threshold
        Write ``Positive``/``Negative`` classes (True) or ``1+``/``2+``/``3+``/``Negative``.
    """

    compartment: str = "Nucleus: DAB OD mean"
    thresholds: tuple[float, float, float] = (0.2, 0.4, 0.6)
    single_threshold: bool = True

    def __post_init__(self) -> None:
        t = tuple(float(v) for v in self.thresholds)
        if len(t) != 3 or not all(math.isfinite(v) for v in t) or not t[0] <= t[1] <= t[2]:
            raise ConfigError(
                f"thresholds must be three finite non-decreasing numbers (1+, 2+, 3+; equal "
                f"ones leave a bin empty), got {self.thresholds!r}"
            )
        known = dict.fromkeys([*measurement_names(1.0), *measurement_names(None)])
        if self.compartment not in known:
            raise ConfigError(
                f"score compartment {self.compartment!r} is not a cell measurement; use one of "
                f"{sorted(known)}"
            )
        object.__setattr__(self, "thresholds", t)

    def class_names(self, bins: NDArray[np.integer[Any]]) -> list[str]:
        """Class name of every cell's bin."""
        if self.single_threshold:
            return [SINGLE_CLASSES[1] if b > 0 else SINGLE_CLASSES[0] for b in bins.tolist()]
        return [INTENSITY_CLASSES[b] for b in bins.tolist()]


def intensity_bins(
    values: NDArray[np.floating[Any]], thresholds: Sequence[float]
) -> NDArray[np.int8]:
    """(n,) bins 0 (negative), 1, 2, 3 of (n,) values: the number of thresholds each value
    reaches (``value >= t``). A NaN value is negative."""
    v = np.asarray(values, dtype=np.float64)
    t = np.asarray(list(thresholds), dtype=np.float64)
    with np.errstate(invalid="ignore"):
        n_reached = (v[:, None] >= t[None, :]).sum(axis=1)
    out: NDArray[np.int8] = n_reached.astype(np.int8)
    return out


@dataclass(frozen=True)
class RegionScore:
    """The scores of one region.

    Attributes
    ----------
    region
        The region's name (its QuPath name, else its class, else ``"Image"``/``"Region <k>"``).
    region_class
        The annotation's class, or None.
    n_cells, n_negative, n_positive, n_1plus, n_2plus, n_3plus
        Cell counts.
    positive_pct
        100 x positive / cells; None without cells.
    pct_1plus, pct_2plus, pct_3plus
        Percent of cells in each bin; None without cells.
    h_score
        1 x %1+ + 2 x %2+ + 3 x %3+ (0..300); None without cells.
    area_um2
        The region's area (µm^2); None without a pixel size.
    cells_per_mm2, positive_per_mm2
        Densities; None without an area.
    mean_dab_od
        Mean of the score compartment over the region's cells; None without cells.
    """

    region: str
    region_class: str | None
    n_cells: int
    n_negative: int
    n_positive: int
    n_1plus: int
    n_2plus: int
    n_3plus: int
    positive_pct: float | None
    pct_1plus: float | None
    pct_2plus: float | None
    pct_3plus: float | None
    h_score: float | None
    area_um2: float | None
    cells_per_mm2: float | None
    positive_per_mm2: float | None
    mean_dab_od: float | None

    def qupath_measurements(self, *, intensity_bins: bool = True) -> dict[str, float]:
        """The scores under the names QuPath's measurement table uses for annotations;
        ``intensity_bins=False`` (single-threshold mode, as QuPath's) leaves out ``Num 1+``,
        ``Num 2+``, ``Num 3+`` and ``H-score``."""
        m: dict[str, float | None] = {
            "Num Detections": self.n_cells,
            "Num Negative": self.n_negative,
            "Num Positive": self.n_positive,
            "Positive %": self.positive_pct,
            "Num 1+": self.n_1plus,
            "Num 2+": self.n_2plus,
            "Num 3+": self.n_3plus,
            "H-score": self.h_score,
            "Area µm^2": self.area_um2,
            "Num Detections per mm^2": self.cells_per_mm2,
            "Num Positive per mm^2": self.positive_per_mm2,
        }
        if not intensity_bins:
            for k in ("Num 1+", "Num 2+", "Num 3+", "H-score"):
                del m[k]
        return {k: float(v) for k, v in m.items() if v is not None}


def score_bins(
    bins: NDArray[np.integer[Any]],
    *,
    region: str = "Image",
    region_class: str | None = None,
    area_um2: float | None = None,
    values: NDArray[np.floating[Any]] | None = None,
) -> RegionScore:
    """Counts, positive %, H-score and densities of cells with known bins.

    Parameters
    ----------
    bins
        (n,) bins 0..3 (:func:`intensity_bins`).
    region, region_class
        Names carried into the result.
    area_um2
        The region's area, for densities (None: no densities).
    values
        (n,) the score compartment's values, for ``mean_dab_od``.
    """
    b = np.asarray(bins).astype(np.intp).ravel()
    if b.size and (b.min() < 0 or b.max() > 3):
        raise ConfigError("bins must be 0 (negative), 1, 2 or 3")
    counts = np.bincount(b, minlength=4)
    n = int(b.size)
    pos = int(counts[1:].sum())

    def pct(k: int) -> float | None:
        return None if n == 0 else 100.0 * float(k) / n

    p1, p2, p3 = pct(int(counts[1])), pct(int(counts[2])), pct(int(counts[3]))
    h = None if n == 0 else float(1.0 * (p1 or 0) + 2.0 * (p2 or 0) + 3.0 * (p3 or 0))
    area_mm2 = None if area_um2 is None or area_um2 <= 0 else area_um2 * 1e-6
    mean_v = None
    if values is not None and n:
        v = np.asarray(values, dtype=np.float64)
        mean_v = float(np.nanmean(v)) if np.isfinite(v).any() else None
    return RegionScore(
        region=region,
        region_class=region_class,
        n_cells=n,
        n_negative=int(counts[0]),
        n_positive=pos,
        n_1plus=int(counts[1]),
        n_2plus=int(counts[2]),
        n_3plus=int(counts[3]),
        positive_pct=pct(pos),
        pct_1plus=p1,
        pct_2plus=p2,
        pct_3plus=p3,
        h_score=h,
        area_um2=area_um2 if area_um2 is None else float(area_um2),
        cells_per_mm2=None if area_mm2 is None else n / area_mm2,
        positive_per_mm2=None if area_mm2 is None else pos / area_mm2,
        mean_dab_od=mean_v,
    )


@dataclass(frozen=True)
class Region:
    """A region to score: a name, an optional class, and a geometry in level-0 pixels (None =
    every cell); ``area_um2`` overrides the geometry's area (e.g. the tissue area)."""

    name: str
    geometry: BaseGeometry | None = None
    class_name: str | None = None
    area_um2: float | None = None
    id: str | None = None


def score_regions(
    cells: CellTable,
    regions: Sequence[Region],
    *,
    rule: PositivityRule,
    mpp: float | None,
) -> tuple[list[RegionScore], NDArray[np.int8]]:
    """Score the cells of each region.

    Parameters
    ----------
    cells
        Detected cells (level-0 centroids, measurements).
    regions
        The regions; a cell counts in each region whose geometry contains its centroid.
    rule
        Compartment and thresholds.
    mpp
        Level-0 pixel size (µm), for areas and densities; None leaves them out.

    Returns
    -------
    (list of RegionScore, ndarray of int8)
        One score per region, and the (n,) bins of every cell.

    Raises
    ------
    ConfigError
        The compartment is not among the cells' measurements.
    """
    import shapely

    if rule.compartment not in cells.measurements:
        raise ConfigError(
            f"score compartment {rule.compartment!r} is not a cell measurement; use one of "
            f"{sorted(cells.measurements)}"
        )
    values = cells.measurements[rule.compartment]
    bins = intensity_bins(values, rule.thresholds)
    out = []
    for reg in regions:
        if reg.geometry is None:
            inside = np.ones(len(cells), dtype=bool)
        else:
            inside = np.asarray(shapely.contains_xy(reg.geometry, cells.x_l0, cells.y_l0))
        area = reg.area_um2
        if area is None and reg.geometry is not None and mpp is not None:
            area = float(reg.geometry.area) * mpp * mpp
        out.append(
            score_bins(
                bins[inside],
                region=reg.name,
                region_class=reg.class_name,
                area_um2=area,
                values=values[inside],
            )
        )
    return out, bins


def cell_features(
    cells: CellTable, bins: NDArray[np.integer[Any]], *, rule: PositivityRule
) -> list[dict[str, Any]]:
    """QuPath cell objects: cell outline as ``geometry``, nucleus outline as the Feature's
    ``nucleusGeometry`` (top level, beside ``geometry``, as QuPath writes it),
    class by :class:`PositivityRule`, and every measurement under its QuPath name.

    Raises
    ------
    ConfigError
        The table has no outlines (detect with ``with_geometry=True``).
    """
    from simsearch_wsi.qupath.geojson import geometry_feature

    if len(cells) and not cells.cells:
        raise ConfigError("the cells have no outlines; detect them with with_geometry=True")
    names = rule.class_names(np.asarray(bins))
    out = []
    keys = list(cells.measurements)
    columns = [cells.measurements[k] for k in keys]
    for i in range(len(cells)):
        meas = {k: float(col[i]) for k, col in zip(keys, columns, strict=True)}
        feat = geometry_feature(
            cells.cells[i],
            class_name=names[i],
            object_type="cell",
            measurements=meas,
            color=_CLASS_RGB.get(names[i]),
        )
        nucleus = geometry_feature(cells.nuclei[i], class_name=None, object_type="cell")
        # QuPath reads and writes the nucleus next to "geometry", at the Feature's top level
        feat["nucleusGeometry"] = nucleus["geometry"]
        out.append(feat)
    return out


def region_features(
    regions: Sequence[Region],
    scores: Sequence[RegionScore],
    *,
    image_size_l0: tuple[int, int],
    rule: PositivityRule | None = None,
) -> list[dict[str, Any]]:
    """The regions as QuPath annotations carrying their scores (:meth:`RegionScore.
    qupath_measurements`; in ``rule``'s single-threshold mode without the 1+/2+/3+ counts and
    H-score); a region without geometry is the image rectangle. The annotation keeps the
    region's id when it has one, so QuPath matches it to the user's annotation."""
    from shapely.geometry import box

    from simsearch_wsi.qupath.geojson import geometry_feature

    out = []
    w, h = image_size_l0
    for reg, sc in zip(regions, scores, strict=True):
        geom = reg.geometry if reg.geometry is not None else box(0, 0, w, h)
        out.append(
            geometry_feature(
                geom,
                class_name=reg.class_name,
                object_type="annotation",
                measurements=sc.qupath_measurements(
                    intensity_bins=rule is None or not rule.single_threshold
                ),
                name=reg.name,
                id=reg.id,
            )
        )
    return out


def score_rows(
    image: str,
    scores: Sequence[RegionScore],
    *,
    extra: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Table rows (one per region) for :func:`simsearch_wsi.infer.quantify.write_table`:
    ``image``, the ``extra`` columns (e.g. a cohort manifest's metadata), then the scores."""
    extra = dict(extra or {})
    check_extra_columns(extra)
    return [{"image": image, **extra, **asdict(s)} for s in scores]


def check_extra_columns(columns: Iterable[str]) -> None:
    """Refuse extra (e.g. manifest metadata) columns named like a score column of
    :func:`score_rows` (ConfigError), so a run can check them before any work."""
    taken = {"image"} | set(RegionScore.__dataclass_fields__)
    clash = sorted(taken & set(columns))
    if clash:
        raise ConfigError(f"extra columns {clash} clash with the score columns; rename them")


#: object types read from GeoJSON as regions to score
REGION_TYPES: tuple[str, ...] = ("annotation", "tmaCore")


def regions_from_annotations(annotations: Sequence[Annotation]) -> list[Region]:
    """The polygonal annotations and TMA cores of a QuPath GeoJSON as regions (detections,
    cells, points and lines are left out). Names: the object's name, else its class, else
    ``"Region <k>"`` (numbered in file order)."""
    out = []
    for k, ann in enumerate(annotations, start=1):
        geom = ann.geometry
        if ann.object_type not in REGION_TYPES or geom is None:
            continue
        if geom.geom_type not in ("Polygon", "MultiPolygon") or geom.area <= 0:
            continue
        if not geom.is_valid:
            geom = geom.buffer(0)
        out.append(
            Region(
                name=ann.name or ann.class_name or f"Region {k}",
                geometry=geom,
                class_name=ann.class_name,
                id=ann.id,
            )
        )
    return out


def image_regions(
    annotations: Sequence[Annotation],
    image_size_l0: tuple[int, int],
    *,
    mpp: float | None,
    where: str,
) -> list[Region]:
    """:func:`regions_from_annotations` then :func:`clip_regions`; what
    :func:`quantify_image` scores, checkable before any detection.

    Raises
    ------
    ConfigError
        No polygonal annotation or TMA core, or none overlapping the image; ``where`` names
        the annotations.
    """
    regions = regions_from_annotations(annotations)
    if not regions:
        raise ConfigError(
            f"{where}: no polygonal annotation or TMA core to score; draw one in QuPath, or "
            "leave the annotations out to score the whole image"
        )
    return clip_regions(regions, image_size_l0, mpp=mpp, where=where)


def clip_regions(
    regions: Sequence[Region],
    image_size_l0: tuple[int, int],
    *,
    mpp: float | None,
    where: str,
) -> list[Region]:
    """The regions with their areas counted inside the image rectangle ``(0, 0, width,
    height)`` only (level-0 pixels; ``area_um2`` set from the clipped geometry when ``mpp`` is
    known), so that a region reaching past the image edge is not diluted by pixels that hold no
    cells. Geometries are kept as given (they are the user's annotations).

    Raises
    ------
    ConfigError
        No region overlaps the image (annotations of another image?); ``where`` names them.
    """
    from shapely.geometry import box

    w, h = image_size_l0
    frame = box(0, 0, w, h)
    out = []
    overlapping = 0
    for reg in regions:
        if reg.geometry is None:
            out.append(reg)
            overlapping += 1
            continue
        inside = reg.geometry.intersection(frame).area
        overlapping += int(inside > 0)
        if reg.area_um2 is None and mpp is not None:
            reg = replace(reg, area_um2=float(inside) * mpp * mpp)
        out.append(reg)
    if regions and overlapping == 0:
        raise ConfigError(
            f"{where}: none of its {len(regions)} regions overlaps the image ({w} x {h} level-0 "
            "px); are the annotations from another image, or in another pixel frame?"
        )
    return out


@dataclass
class IhcResult:
    """What :func:`quantify_image` found: the cells, their bins, the regions and scores."""

    cells: CellTable
    bins: NDArray[np.int8]
    regions: list[Region]
    scores: list[RegionScore]


def quantify_image(
    image: ImageSource,
    *,
    annotations: Sequence[Annotation] | None = None,
    params: CellDetectionParams | None = None,
    rule: PositivityRule | None = None,
    stains: StainVectors = QUPATH_H_DAB,
    tissue: bool = False,
    with_geometry: bool = True,
    tile_px: int = 1024,
    progress: Callable[[int, int], None] | None = None,
    regions_source: str | None = None,
) -> IhcResult:
    """Detect, classify and score the cells of a brightfield IHC image.

    Parameters
    ----------
    image
        An open uint8 RGB image with a known pixel size.
    annotations
        QuPath objects (:func:`simsearch_wsi.qupath.geojson.read_features`); their annotations
        and TMA cores are the regions; only tiles over them are processed and only cells
        inside one of them are kept. None: the whole image is one region.
    params, stains, tile_px, with_geometry, progress
        As in :func:`simsearch_wsi.infer.cells.detect_cells`.
    rule
        Compartment and thresholds (default :class:`PositivityRule`).
    regions_source
        How error messages name the annotations (their file); default the image's path.
    tissue
        Without annotations: restrict to the tissue foreground
        (:func:`simsearch_wsi.features.tissue.detect_foreground`; tiles without tissue are
        skipped, cells outside it are dropped, densities are per mm^2 of tissue). Off by
        default: on IHC the foreground threshold can miss pale, DAB-negative stroma (it
        dropped every stromal cell of scikit-image's IHC sample), which would bias positive %.
        False: the whole image, densities per mm^2 of image.

    Returns
    -------
    IhcResult

    Raises
    ------
    ConfigError
        Annotations given but none of them is a polygonal annotation or TMA core, or none of
        them overlaps the image.
    """
    import shapely

    from simsearch_wsi.infer.cells import detect_cells

    rule = rule or PositivityRule()
    mpp = image.mpp
    w0, h0 = image.dimensions
    skip = None
    fg_mask: TissueMask | None = None
    if annotations is not None:
        regions = image_regions(
            annotations, (w0, h0), mpp=mpp, where=regions_source or str(image.path)
        )
        boxes = [
            (g.bounds[0], g.bounds[1], g.bounds[2] - g.bounds[0], g.bounds[3] - g.bounds[1])
            for g in (r.geometry for r in regions)
            if g is not None
        ]
        from shapely.geometry import box

        union = shapely.union_all([r.geometry for r in regions])
        shapely.prepare(union)  # tested once per tile and once per cell

        def skip(core: tuple[float, float, float, float]) -> bool:
            return not union.intersects(box(*core))

    else:
        boxes = None
        area_um2 = None if mpp is None else w0 * h0 * mpp * mpp
        if tissue:
            from simsearch_wsi.features.tissue import detect_foreground

            fg_mask = detect_foreground(image)
            tissue_mask = fg_mask
            if mpp is not None:
                area_um2 = float(fg_mask.mask.sum()) * fg_mask.downsample_x
                area_um2 *= fg_mask.downsample_y * mpp * mpp

            def skip(core: tuple[float, float, float, float]) -> bool:
                x0, y0, x1, y1 = core
                return tissue_mask.fraction_in_box(x0, y0, x1 - x0, y1 - y0) == 0

        regions = [Region(name="Image", area_um2=area_um2)]
    cells = detect_cells(
        image,
        boxes_l0=boxes,
        params=params,
        stains=stains,
        tile_px=tile_px,
        with_geometry=with_geometry,
        skip_tile=skip,
        progress=progress,
    )
    if annotations is not None and len(cells):
        # as QuPath detects inside the annotations only: cells outside every region are dropped
        cells = cells.take(np.asarray(shapely.contains_xy(union, cells.x_l0, cells.y_l0)))
    if fg_mask is not None and len(cells):
        m = fg_mask.mask
        i = np.clip((cells.y_l0 // fg_mask.downsample_y).astype(np.intp), 0, m.shape[0] - 1)
        j = np.clip((cells.x_l0 // fg_mask.downsample_x).astype(np.intp), 0, m.shape[1] - 1)
        cells = cells.take(m[i, j])
    scores, bins = score_regions(cells, regions, rule=rule, mpp=mpp)
    return IhcResult(cells=cells, bins=bins, regions=regions, scores=scores)
