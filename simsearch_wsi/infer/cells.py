"""Cell detection for brightfield IHC, as QuPath's positive cell detection does it.

Steps (per tile, with a halo; a cell is kept by the tile whose core holds its nucleus
centroid, so every cell is found once and none is cut at a tile border):

1. **Colour deconvolution** (:func:`stain_od`): optical density ``OD = -log10(I / I0)`` per RGB
   channel (``I0`` = 255, the white background), unmixed with the hematoxylin and DAB stain
   vectors (QuPath's "H-DAB default", :data:`QUPATH_H_DAB`, or vectors estimated per slide by
   :func:`estimate_stains`). Units are QuPath's: a DAB OD of 0.2 here is 0.2 in QuPath.
2. **Nuclei** (:func:`detect_nuclei`): the hematoxylin OD (or the OD sum) minus a background
   (grey opening of ``background_radius_um``), Gaussian smoothing (``sigma_um``), a threshold
   (``threshold_od``), holes filled, touching nuclei split by a watershed of the distance
   transform (of the smoothed image, with a half-maximum outline, where the thresholded area
   is larger than a nucleus: dense tissue), nuclei outside ``[min_area_um2, max_area_um2]``
   dropped. StarDist is not used (not a dependency).
3. **Cells**: nuclei grown by ``cell_expansion_um`` without overlapping
   (:func:`skimage.segmentation.expand_labels`).
4. **Measurements** per cell, named as QuPath names them (:data:`MEASUREMENTS`): nucleus and
   cell areas, hematoxylin and DAB OD mean/max/min/std dev of the nucleus, the cell and the
   cytoplasm (cell minus nucleus).

Processing happens at about ``pixel_size_um`` (QuPath's "requested pixel size", 0.5 um): on the
coarsest pyramid level at most 10 % coarser than it, its pixels averaged in f x f blocks, f the
integer that brings them nearest the requested size when that lands within 10 % of it (0.25
um/px slides work at 0.5 um/px, f = 2), else the largest f not above it; no whole level is
loaded. See :func:`working_scale`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import validate_mpp

if TYPE_CHECKING:
    from shapely.geometry import Polygon

    from simsearch_wsi.io.base import ImageSource

__all__ = [
    "MEASUREMENTS",
    "QUPATH_H_DAB",
    "CellDetectionParams",
    "CellTable",
    "StainVectors",
    "check_brightfield",
    "detect_cells",
    "detect_cells_rgb",
    "detect_nuclei",
    "estimate_image_stains",
    "estimate_stains",
    "stain_od",
    "working_scale",
]


@dataclass(frozen=True)
class StainVectors:
    """Hematoxylin and DAB optical-density vectors (r, g, b), normalised to unit length;
    ``background`` is the RGB of unstained glass (``I0``)."""

    hematoxylin: tuple[float, float, float]
    dab: tuple[float, float, float]
    background: tuple[float, float, float] = (255.0, 255.0, 255.0)

    def __post_init__(self) -> None:
        for name in ("hematoxylin", "dab"):
            v = np.asarray(getattr(self, name), dtype=np.float64)
            if v.shape != (3,) or not np.isfinite(v).all() or (v < 0).any() or v.sum() == 0:
                raise ConfigError(f"{name} stain vector must be 3 finite numbers >= 0, got {v}")
            object.__setattr__(self, name, tuple(float(x) for x in v / np.linalg.norm(v)))
        bg = np.asarray(self.background, dtype=np.float64)
        if bg.shape != (3,) or not np.isfinite(bg).all() or (bg <= 0).any():
            raise ConfigError(f"background must be 3 positive numbers, got {self.background!r}")
        object.__setattr__(self, "background", tuple(float(x) for x in bg))
        if abs(float(np.dot(self.hematoxylin, self.dab))) > 0.999:
            raise ConfigError("hematoxylin and DAB stain vectors are parallel; re-estimate them")

    def unmixing(self) -> NDArray[np.float64]:
        """(3, 3) matrix ``U`` with ``[H, DAB, residual] = OD_rgb @ U``."""
        h, d = np.asarray(self.hematoxylin), np.asarray(self.dab)
        r = np.cross(h, d)
        r = r / np.linalg.norm(r)
        return np.linalg.inv(np.stack([h, d, r]))


#: QuPath's default "H-DAB" stain vectors (Ruifrok & Johnston), white background
QUPATH_H_DAB = StainVectors(
    hematoxylin=(0.65111, 0.70119, 0.29049), dab=(0.26917, 0.56824, 0.77759)
)

#: per-cell measurement names, as QuPath's cell detection writes them (``{area}`` is
#: ``µm^2`` with a pixel size, ``px^2`` without)
MEASUREMENTS: tuple[str, ...] = (
    "Nucleus: Area {area}",
    "Nucleus: Hematoxylin OD mean",
    "Nucleus: DAB OD mean",
    "Nucleus: DAB OD max",
    "Nucleus: DAB OD min",
    "Nucleus: DAB OD std dev",
    "Cytoplasm: DAB OD mean",
    "Cell: Area {area}",
    "Cell: DAB OD mean",
    "Cell: DAB OD max",
    "Nucleus/Cell area ratio",
)


def _od_rgb(rgb: NDArray[Any], background: tuple[float, float, float]) -> NDArray[np.float32]:
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ConfigError(f"brightfield pixels must be (H, W, 3) RGB, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ConfigError(f"brightfield pixels must be uint8, got dtype {arr.dtype}")
    # lookup table per channel: OD of every 8-bit value, 0 clipped to 1 (as QuPath does)
    values = np.maximum(np.arange(256, dtype=np.float64), 1.0)
    out = np.empty(arr.shape, dtype=np.float32)
    for c in range(3):
        lut = np.maximum(-np.log10(values / background[c]), 0.0).astype(np.float32)
        out[..., c] = lut[arr[..., c]]
    return out


def stain_od(rgb: NDArray[np.uint8], stains: StainVectors = QUPATH_H_DAB) -> NDArray[np.float32]:
    """Colour deconvolution of brightfield pixels into hematoxylin and DAB optical density.

    Parameters
    ----------
    rgb
        (H, W, 3) uint8 RGB.
    stains
        The stain vectors; default QuPath's H-DAB default.

    Returns
    -------
    ndarray of float32
        (H, W, 2): hematoxylin OD, DAB OD (log10 units; QuPath's values for the same vectors).
        Values may be slightly negative where a pixel is bluer/browner than the other stain.
    """
    od = _od_rgb(rgb, stains.background)
    u = stains.unmixing()[:, :2].astype(np.float32)
    out: NDArray[np.float32] = od.reshape(-1, 3).dot(u).reshape(*od.shape[:2], 2)
    return out


def estimate_stains(
    rgb: NDArray[np.uint8],
    *,
    min_od: float = 0.15,
    percentile: float = 1.0,
    background: tuple[float, float, float] = (255.0, 255.0, 255.0),
) -> StainVectors:
    """Estimate hematoxylin and DAB vectors of one image (Macenko et al. 2009).

    The OD vectors of stained pixels (OD sum > ``min_od``) are projected onto the plane of their
    two main directions; the directions at the ``percentile`` and ``100 - percentile`` of the
    angles in that plane are the two stains. The one with the larger red OD is hematoxylin.

    Parameters
    ----------
    rgb
        (H, W, 3) uint8 RGB, e.g. a thumbnail or a representative tile.

    Raises
    ------
    ConfigError
        Fewer than 100 stained pixels.
    """
    od = _od_rgb(rgb, background).reshape(-1, 3).astype(np.float64)
    od = od[od.sum(axis=1) > min_od]
    if len(od) < 100:
        raise ConfigError(
            f"only {len(od)} stained pixels (OD sum > {min_od}); estimate the stains on a "
            "region with tissue, or use the default H-DAB vectors"
        )
    _, _, vt = np.linalg.svd(od, full_matrices=False)
    plane = vt[:2].T  # (3, 2)
    if plane[:, 0].sum() < 0:
        plane[:, 0] *= -1
    if plane[:, 1].sum() < 0:
        plane[:, 1] *= -1
    proj = od @ plane
    angles = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(angles, [percentile, 100.0 - percentile])
    v1 = plane @ np.array([math.cos(lo), math.sin(lo)])
    v2 = plane @ np.array([math.cos(hi), math.sin(hi)])
    v1, v2 = np.abs(v1), np.abs(v2)
    v1, v2 = v1 / np.linalg.norm(v1), v2 / np.linalg.norm(v2)
    h, d = (v1, v2) if v1[0] > v2[0] else (v2, v1)
    return StainVectors(
        hematoxylin=(float(h[0]), float(h[1]), float(h[2])),
        dab=(float(d[0]), float(d[1]), float(d[2])),
        background=background,
    )


@dataclass(frozen=True)
class CellDetectionParams:
    """Cell detection settings; the defaults are QuPath's positive cell detection defaults.

    Attributes
    ----------
    pixel_size_um
        Work at about this pixel size (within 10 %, :func:`working_scale`): a pyramid level,
        its pixels averaged in integer f x f blocks.
    detection_image
        ``"hematoxylin"`` (QuPath's "Hematoxylin OD") or ``"od_sum"`` (QuPath's "Optical
        density sum"; better when DAB-positive nuclei hold little hematoxylin).
    background_radius_um
        Radius of the grey opening subtracted as background; 0 = none.
    sigma_um
        Gaussian smoothing before thresholding.
    min_area_um2, max_area_um2
        Nucleus area range kept.
    threshold_od
        Threshold on the background-subtracted, smoothed detection image.
    split
        Split touching nuclei (see :func:`detect_nuclei`).
    cell_expansion_um
        Distance the nuclei are grown by to make cells; 0 = cells are the nuclei.
    """

    pixel_size_um: float = 0.5
    detection_image: str = "hematoxylin"
    background_radius_um: float = 8.0
    sigma_um: float = 1.5
    min_area_um2: float = 10.0
    max_area_um2: float = 400.0
    threshold_od: float = 0.1
    split: bool = True
    cell_expansion_um: float = 5.0

    def __post_init__(self) -> None:
        if self.detection_image not in ("hematoxylin", "od_sum"):
            raise ConfigError(
                f"detection image {self.detection_image!r} is unknown; use 'hematoxylin' or "
                "'od_sum'"
            )
        for name in ("pixel_size_um", "sigma_um", "max_area_um2"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        for name in ("background_radius_um", "min_area_um2", "cell_expansion_um"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
        if not math.isfinite(self.threshold_od):
            raise ConfigError(f"threshold_od must be finite, got {self.threshold_od!r}")
        if self.min_area_um2 >= self.max_area_um2:
            raise ConfigError(
                f"min_area_um2 ({self.min_area_um2}) must be below max_area_um2 "
                f"({self.max_area_um2})"
            )

    def halo_um(self) -> float:
        """Context a tile needs around its core for its cells to be complete."""
        nucleus_diameter = 2.0 * math.sqrt(self.max_area_um2 / math.pi)
        return (
            nucleus_diameter
            + self.cell_expansion_um
            + self.background_radius_um
            + 3.0 * self.sigma_um
        )


def _label_extreme(
    values: NDArray[Any], labels: NDArray[Any], n: int, *, kind: str
) -> NDArray[np.float64]:
    """(n,) max (``kind="max"``) or min of ``values`` over each label 1..n (NaN where a label
    has no pixel); only labelled pixels are visited (faster than scipy.ndimage's sort)."""
    inside = labels > 0
    lab = labels[inside].astype(np.intp)
    v = values[inside].astype(np.float64)
    if kind == "max":
        out = np.full(n + 1, -np.inf)
        np.maximum.at(out, lab, v)
    else:
        out = np.full(n + 1, np.inf)
        np.minimum.at(out, lab, v)
    out[~np.isfinite(out)] = np.nan
    result: NDArray[np.float64] = out[1:]
    return result


def _split(
    smooth: NDArray[np.float32],
    mask: NDArray[np.bool_],
    comp: NDArray[np.int32],
    n_comp: int,
    *,
    thr: float,
    min_px: float,
    max_px: float,
) -> NDArray[np.int32]:
    """Split touching nuclei. Components of at most ``max_px`` pixels: a watershed of their
    distance transform (one seed per distance maximum at least a minimal nucleus' radius apart).
    Larger ones (dense tissue whose OD stays above the threshold between nuclei): one seed per
    local maximum of the smoothed image with a contrast of at least ``thr`` over its basin,
    each nucleus the part of its basin above half its peak (the edge of a blurred disk)."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    r_min = max(1, round(math.sqrt(min_px / math.pi)))
    sizes = np.bincount(comp.ravel(), minlength=n_comp + 1)
    big = sizes > max_px
    big[0] = False
    small_mask = mask & ~big[comp]
    dist = ndi.gaussian_filter(ndi.distance_transform_edt(small_mask), 1.0)
    small_comp = np.where(small_mask, comp, 0)
    peaks = peak_local_max(dist, min_distance=r_min, labels=small_comp, exclude_border=False)
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    has = np.zeros(n_comp + 1, dtype=bool)
    has[comp[tuple(peaks.T)]] = True
    lonely = np.flatnonzero(~has[1:] & ~big[1:]) + 1
    for k, (r, c) in enumerate(ndi.maximum_position(dist, small_comp, lonely)):
        markers[int(r), int(c)] = len(peaks) + 1 + k
    labels: NDArray[np.int32] = np.asarray(watershed(-dist, markers, mask=small_mask), np.int32)
    if not big.any():
        return labels
    big_mask = mask & big[comp]
    big_comp = np.where(big_mask, comp, 0)
    bpeaks = peak_local_max(
        smooth, min_distance=r_min, threshold_abs=thr, labels=big_comp, exclude_border=False
    )
    if len(bpeaks) == 0:
        return labels
    bmarkers = np.zeros(mask.shape, dtype=np.int32)
    bmarkers[tuple(bpeaks.T)] = np.arange(1, len(bpeaks) + 1, dtype=np.int32)
    basins = watershed(-smooth, bmarkers, mask=big_mask)
    peak = np.zeros(len(bpeaks) + 1, dtype=np.float32)
    low = np.zeros(len(bpeaks) + 1, dtype=np.float32)
    peak[1:] = _label_extreme(smooth, basins, len(bpeaks), kind="max")
    low[1:] = _label_extreme(smooth, basins, len(bpeaks), kind="min")
    cut = np.maximum(thr, 0.5 * peak)
    cut[(peak - low) < thr] = np.inf  # flat: no nucleus there
    cut[0] = np.inf
    core = ndi.binary_fill_holes(smooth >= cut[basins])
    keep = np.flatnonzero(np.isfinite(cut))
    bmarkers[~np.isin(bmarkers, keep)] = 0
    blabels = watershed(-smooth, bmarkers, mask=core & big_mask)
    offset = int(labels.max())
    labels[blabels > 0] = blabels[blabels > 0] + offset
    return labels


def detect_nuclei(
    od: NDArray[np.float32], *, px_um: float, params: CellDetectionParams
) -> NDArray[np.int32]:
    """Nucleus labels of one tile.

    Parameters
    ----------
    od
        (H, W, 2) hematoxylin and DAB OD (:func:`stain_od`).
    px_um
        Pixel size of ``od`` in micrometres.
    params
        Detection settings.

    Returns
    -------
    ndarray of int32
        (H, W) labels, 0 = background, 1..n nuclei (consecutive).
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import relabel_sequential

    img = od[..., 0] if params.detection_image == "hematoxylin" else od[..., 0] + od[..., 1]
    img = img.astype(np.float32, copy=True)
    r_bg = round(params.background_radius_um / px_um)
    if r_bg > 0:
        from skimage.morphology import disk, opening

        # grey opening by a disk (decomposed into a sequence of small footprints: fast)
        img -= opening(img, disk(r_bg, decomposition="sequence"))
    smooth = ndi.gaussian_filter(img, params.sigma_um / px_um)
    # the smoothed image finds the nuclei; the unsmoothed one (opened by a 3 x 3 square to drop
    # single-pixel noise) sets their outline, so that smoothing does not grow nuclei into the
    # cytoplasm
    thr = params.threshold_od
    fine = ndi.binary_opening(img > thr, structure=np.ones((3, 3), dtype=bool))
    mask = ndi.binary_fill_holes(ndi.binary_fill_holes(smooth > thr) & fine)
    px_area = px_um * px_um
    min_px = params.min_area_um2 / px_area
    max_px = params.max_area_um2 / px_area
    comp, n_comp = ndi.label(mask)
    if n_comp == 0:
        return np.zeros(mask.shape, dtype=np.int32)
    if params.split:
        labels = _split(smooth, mask, comp, n_comp, thr=thr, min_px=min_px, max_px=max_px)
    else:
        labels = comp.astype(np.int32)
    areas = np.bincount(labels.ravel())
    bad = (areas < min_px) | (areas > max_px)
    bad[0] = False
    labels[bad[labels]] = 0
    relabelled, _, _ = relabel_sequential(labels)
    out: NDArray[np.int32] = np.asarray(relabelled, dtype=np.int32)
    return out


@dataclass
class CellTable:
    """Cells of an image (or region).

    Attributes
    ----------
    x_l0, y_l0
        (n,) nucleus centroids, level-0 pixels.
    measurements
        Measurement name (:data:`MEASUREMENTS`) -> (n,) float64 values.
    nuclei, cells
        n nucleus and cell outlines (shapely Polygons, level-0 pixels), or empty lists when
        geometry was not asked for.
    level
        The pyramid level detection ran on; ``downsample`` its level-0 pixels per pixel.
    px_um
        The pixel size detection ran at, micrometres (None without a pixel size).
    """

    x_l0: NDArray[np.float64]
    y_l0: NDArray[np.float64]
    measurements: dict[str, NDArray[np.float64]]
    nuclei: list[Polygon] = field(default_factory=list)
    cells: list[Polygon] = field(default_factory=list)
    level: int = 0
    downsample: float = 1.0
    px_um: float | None = None

    def __len__(self) -> int:
        return int(self.x_l0.size)

    def take(self, index: NDArray[Any]) -> CellTable:
        """The cells at ``index`` (an int index array or a bool mask)."""
        idx = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index)
        return CellTable(
            x_l0=self.x_l0[idx],
            y_l0=self.y_l0[idx],
            measurements={k: v[idx] for k, v in self.measurements.items()},
            nuclei=[self.nuclei[i] for i in idx] if self.nuclei else [],
            cells=[self.cells[i] for i in idx] if self.cells else [],
            level=self.level,
            downsample=self.downsample,
            px_um=self.px_um,
        )

    @staticmethod
    def concat(tables: Sequence[CellTable], *, names: Sequence[str]) -> CellTable:
        """One table of several (same level); ``names`` are the measurement names."""
        if not tables:
            return CellTable(
                x_l0=np.zeros(0),
                y_l0=np.zeros(0),
                measurements={k: np.zeros(0) for k in names},
            )
        first = tables[0]
        return CellTable(
            x_l0=np.concatenate([t.x_l0 for t in tables]),
            y_l0=np.concatenate([t.y_l0 for t in tables]),
            measurements={k: np.concatenate([t.measurements[k] for t in tables]) for k in names},
            nuclei=[p for t in tables for p in t.nuclei],
            cells=[p for t in tables for p in t.cells],
            level=first.level,
            downsample=first.downsample,
            px_um=first.px_um,
        )


def measurement_names(px_um: float | None) -> list[str]:
    """:data:`MEASUREMENTS` with the area unit filled in."""
    unit = "µm^2" if px_um is not None else "px^2"
    return [m.format(area=unit) for m in MEASUREMENTS]


def _stats(
    values: NDArray[np.float32], labels: NDArray[np.int32], n: int, *, extremes: bool = True
) -> tuple[NDArray[np.float64], ...]:
    """count, mean, max, min, std of ``values`` per label 1..n (max and min NaN without
    ``extremes``: they are the slow part)."""
    flat = labels.ravel()
    v = values.ravel().astype(np.float64)
    count = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    total = np.bincount(flat, weights=v, minlength=n + 1)[1:]
    sq = np.bincount(flat, weights=v * v, minlength=n + 1)[1:]
    safe = np.maximum(count, 1)
    mean = total / safe
    std = np.sqrt(np.maximum(sq / safe - mean * mean, 0.0))
    if extremes:
        vmax = _label_extreme(values, labels, n, kind="max")
        vmin = _label_extreme(values, labels, n, kind="min")
    else:
        vmax, vmin = np.full(n, np.nan), np.full(n, np.nan)
    empty = count == 0
    for a in (mean, std, vmax, vmin):
        a[empty] = np.nan
    return count, mean, vmax, vmin, std


def _outline(
    mask: NDArray[np.bool_], x0: float, y0: float, scale: tuple[float, float]
) -> Polygon | None:
    """Outer contour of a binary crop as a polygon; pixel (i, j) covers [j, j+1) x [i, i+1);
    ``scale`` (sx, sy) maps those pixels to level-0 pixels."""
    from shapely.geometry import Polygon
    from skimage.measure import find_contours

    padded = np.pad(mask, 1).astype(np.float32)
    contours = find_contours(padded, 0.5)
    if not contours:
        return None
    ring = max(contours, key=len)
    sx, sy = scale
    xy = np.stack([(ring[:, 1] - 1 + 0.5 + x0) * sx, (ring[:, 0] - 1 + 0.5 + y0) * sy], axis=1)
    if len(xy) < 4:
        return None
    # drop the collinear points of the pixel-edge contour (0.25 px keeps the shape)
    poly = Polygon(xy).simplify(0.25 * min(sx, sy), preserve_topology=True)
    if not poly.is_valid:
        poly = poly.buffer(0)
        if poly.geom_type != "Polygon":
            return None
    return poly if not poly.is_empty else None


def _measure_tile(
    od: NDArray[np.float32],
    *,
    px_um: float,
    params: CellDetectionParams,
    core: tuple[int, int, int, int],
    offset_lvl: tuple[int, int],
    downsample: tuple[float, float],
    with_geometry: bool,
    inside: tuple[int, int, int, int] | None = None,
) -> CellTable:
    """Detect and measure the cells of one tile whose nucleus centroid lies in ``core``
    (x0, y0, x1, y1 in tile pixels); coordinates out are level-0 (``downsample``: level-0
    pixels per tile pixel along x and along y). Cells do not grow past
    ``inside`` (x0, y0, x1, y1 in tile pixels: the part of the tile within the image)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import expand_labels

    names = measurement_names(px_um)
    dsx, dsy = downsample
    nuc = detect_nuclei(od, px_um=px_um, params=params)
    n = int(nuc.max())
    if n == 0:
        return CellTable.concat([], names=names)
    grow_px = params.cell_expansion_um / px_um
    cell = expand_labels(nuc, distance=grow_px) if grow_px > 0 else nuc
    if inside is not None:
        ix0, iy0, ix1, iy1 = inside
        within = np.zeros(nuc.shape, dtype=bool)
        within[max(iy0, 0) : max(iy1, 0), max(ix0, 0) : max(ix1, 0)] = True
        nuc = np.where(within, nuc, 0).astype(np.int32)
        cell = np.where(within, cell, 0).astype(np.int32)
    idx = np.arange(1, n + 1)
    cy, cx = (
        np.asarray(a, dtype=np.float64)
        for a in zip(*ndi.center_of_mass(nuc > 0, nuc, idx), strict=False)
    )
    # centroid in pixel-corner coordinates: pixel (i, j) is centred at (j + 0.5, i + 0.5)
    cxp, cyp = cx + 0.5, cy + 0.5
    x0, y0, x1, y1 = core
    keep = (cxp >= x0) & (cxp < x1) & (cyp >= y0) & (cyp < y1)
    hema, dab = od[..., 0], od[..., 1]
    cyto = np.where(nuc > 0, 0, cell).astype(np.int32)
    n_cnt, n_dab_mean, n_dab_max, n_dab_min, n_dab_std = _stats(dab, nuc, n)
    _, n_h_mean, _, _, _ = _stats(hema, nuc, n, extremes=False)
    c_cnt, c_dab_mean, c_dab_max, _, _ = _stats(dab, cell, n)
    _, cy_dab_mean, _, _, _ = _stats(dab, cyto, n, extremes=False)
    nuc_area, cell_area = n_cnt * px_um * px_um, c_cnt * px_um * px_um
    values = [
        nuc_area,
        n_h_mean,
        n_dab_mean,
        n_dab_max,
        n_dab_min,
        n_dab_std,
        cy_dab_mean,
        cell_area,
        c_dab_mean,
        c_dab_max,
        n_cnt / np.maximum(c_cnt, 1),
    ]
    ox, oy = offset_lvl
    nuclei: list[Polygon] = []
    cells: list[Polygon] = []
    kept = np.flatnonzero(keep)
    if with_geometry:
        slices_n = ndi.find_objects(nuc)
        slices_c = ndi.find_objects(cell)
        ok = []
        for i in kept:
            sn, sc = slices_n[i], slices_c[i]
            if sn is None or sc is None:
                continue
            pn = _outline(nuc[sn] == i + 1, sn[1].start + ox, sn[0].start + oy, (dsx, dsy))
            pc = _outline(cell[sc] == i + 1, sc[1].start + ox, sc[0].start + oy, (dsx, dsy))
            if pn is None or pc is None:
                continue
            ok.append(i)
            nuclei.append(pn)
            cells.append(pc)
        kept = np.asarray(ok, dtype=np.intp)
    return CellTable(
        x_l0=(cxp[kept] + ox) * dsx,
        y_l0=(cyp[kept] + oy) * dsy,
        measurements={
            k: np.asarray(v, dtype=np.float64)[kept] for k, v in zip(names, values, strict=True)
        },
        nuclei=nuclei,
        cells=cells,
        downsample=math.sqrt(dsx * dsy),
        px_um=px_um,
    )


#: relative tolerance of the working pixel size around the requested one
PIXEL_SIZE_TOLERANCE = 0.1


def working_scale(
    mpp: float, level_downsamples: Sequence[float], pixel_size_um: float
) -> tuple[int, int]:
    """The pyramid level and integer block factor f that bring level-0 pixels of ``mpp`` µm to
    about ``pixel_size_um``, as QuPath resamples to its requested pixel size.

    The level is the coarsest whose pixels are at most 10 % (:data:`PIXEL_SIZE_TOLERANCE`)
    coarser than requested (level 0 when none is); f is ``round(requested / level pixel)``
    when that lands within 10 % of the request, else the largest f not above it (>= 1).
    E.g. 0.2527 µm/px and 0.5 requested: f = 2 (0.505 µm/px), not 1.

    Parameters
    ----------
    mpp
        Level-0 pixel size, µm.
    level_downsamples
        Level-0 pixels per pixel of each level (x axis), level 0 first.
    pixel_size_um
        The requested working pixel size, µm.

    Returns
    -------
    (int, int)
        Level index and f.
    """
    tol = PIXEL_SIZE_TOLERANCE
    level = 0
    for k, d in enumerate(level_downsamples):
        if mpp * d <= pixel_size_um * (1 + tol) and d > level_downsamples[level]:
            level = k
    lv_um = mpp * level_downsamples[level]
    ratio = pixel_size_um / lv_um
    f = max(1, round(ratio))
    if abs(f * lv_um - pixel_size_um) > tol * pixel_size_um:
        f = max(1, math.floor(ratio + 1e-6))
    return level, f


def detect_cells_rgb(
    rgb: NDArray[np.uint8],
    *,
    mpp: float,
    params: CellDetectionParams | None = None,
    stains: StainVectors = QUPATH_H_DAB,
    with_geometry: bool = False,
) -> CellTable:
    """Detect and measure the cells of one in-memory RGB image (no resampling).

    Parameters
    ----------
    rgb
        (H, W, 3) uint8 brightfield pixels.
    mpp
        Pixel size of ``rgb`` in micrometres.
    params, stains, with_geometry
        As in :func:`detect_cells`.

    Returns
    -------
    CellTable
        Coordinates in the pixels of ``rgb``.
    """
    params = params or CellDetectionParams()
    px_um = validate_mpp(mpp, source="detect_cells_rgb")
    od = stain_od(rgb, stains)
    h, w = od.shape[:2]
    return _measure_tile(
        od,
        px_um=px_um,
        params=params,
        core=(0, 0, w, h),
        offset_lvl=(0, 0),
        downsample=(1.0, 1.0),
        with_geometry=with_geometry,
    )


def check_brightfield(image: ImageSource) -> None:
    """Refuse (ConfigError) an image :func:`detect_cells` cannot run on: not uint8 RGB, or
    without a pixel size; cheap, so a run can check all its images before any work."""
    if image.n_channels != 3 or image.dtype != np.uint8:
        raise ConfigError(
            f"{image.path}: cell detection needs brightfield uint8 RGB, got {image.n_channels} "
            f"channels of {image.dtype}"
        )
    if image.mpp is None:
        raise ConfigError(
            f"{image.path}: the pixel size is unknown; give it (--mpp) so that areas and "
            "cell sizes are in micrometres"
        )


def detect_cells(
    image: ImageSource,
    *,
    boxes_l0: Sequence[tuple[float, float, float, float]] | None = None,
    params: CellDetectionParams | None = None,
    stains: StainVectors = QUPATH_H_DAB,
    tile_px: int = 1024,
    with_geometry: bool = True,
    skip_tile: Callable[[tuple[float, float, float, float]], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CellTable:
    """Detect and measure the cells of a brightfield image, tile by tile.

    Parameters
    ----------
    image
        An open brightfield (uint8 RGB) image; its pixel size must be known.
    boxes_l0
        ``(x, y, width, height)`` level-0 boxes to cover (e.g. the bounds of the annotations);
        default the whole image. Tiles are laid over the union of their bounds; a cell is
        found once even where boxes overlap.
    params
        Detection settings (default :class:`CellDetectionParams`).
    stains
        Stain vectors (default QuPath's H-DAB default).
    tile_px
        Core side of a tile, in pixels of the working level (>= 128); a halo of
        :meth:`CellDetectionParams.halo_um` is read around it.
    with_geometry
        Trace nucleus and cell outlines (for QuPath objects); False is faster.
    skip_tile
        Called with a tile core's level-0 ``(x0, y0, x1, y1)``; True skips the tile (e.g. no
        tissue there).
    progress
        Called with (tiles done, tiles in all).

    Returns
    -------
    CellTable
        Every cell whose nucleus centroid lies in a tile core, level-0 coordinates.

    Raises
    ------
    ConfigError
        Not uint8 RGB, unknown pixel size, a bad tile size.
    """
    params = params or CellDetectionParams()
    check_brightfield(image)
    assert image.mpp is not None  # checked above
    if isinstance(tile_px, bool) or not isinstance(tile_px, int) or not 128 <= tile_px <= 8192:
        raise ConfigError(f"tile_px must be an integer in 128..8192, got {tile_px!r}")
    level, f = working_scale(
        image.mpp, [lv.downsample_x for lv in image.levels], params.pixel_size_um
    )
    lv = image.levels[level]
    dsx, dsy = lv.downsample_x * f, lv.downsample_y * f  # level-0 px per working px
    ds = math.sqrt(dsx * dsy)
    px_um = image.mpp * ds
    halo = math.ceil(params.halo_um() / px_um)
    work_w, work_h = lv.width // f, lv.height // f
    w0, h0 = image.dimensions
    if boxes_l0:
        b = np.asarray(boxes_l0, dtype=np.float64).reshape(-1, 4)
        bx0, by0 = max(0.0, b[:, 0].min()), max(0.0, b[:, 1].min())
        bx1 = min(float(w0), (b[:, 0] + b[:, 2]).max())
        by1 = min(float(h0), (b[:, 1] + b[:, 3]).max())
    else:
        bx0, by0, bx1, by1 = 0.0, 0.0, float(w0), float(h0)
    gx0, gy0 = math.floor(bx0 / dsx), math.floor(by0 / dsy)
    gx1 = min(work_w, math.ceil(bx1 / dsx))
    gy1 = min(work_h, math.ceil(by1 / dsy))
    names = measurement_names(px_um)
    cores = [
        (x, y, min(x + tile_px, gx1), min(y + tile_px, gy1))
        for y in range(gy0, max(gy1, gy0), tile_px)
        for x in range(gx0, max(gx1, gx0), tile_px)
    ]
    parts = []
    for k, (x0, y0, x1, y1) in enumerate(cores):
        core_l0 = (x0 * dsx, y0 * dsy, x1 * dsx, y1 * dsy)
        if skip_tile is None or not skip_tile(core_l0):
            rx0, ry0 = x0 - halo, y0 - halo
            width, height = x1 - x0 + 2 * halo, y1 - y0 + 2 * halo
            loc = (round(rx0 * dsx), round(ry0 * dsy))
            rgb = image.read_region(loc, level, (width * f, height * f), fill=255)[..., :3]
            if f > 1:
                blocks = rgb.reshape(height, f, width, f, 3).astype(np.float32).mean(axis=(1, 3))
                rgb = np.rint(blocks).astype(np.uint8)
            od = stain_od(np.ascontiguousarray(rgb), stains)
            t = _measure_tile(
                od,
                px_um=px_um,
                params=params,
                core=(halo, halo, halo + x1 - x0, halo + y1 - y0),
                offset_lvl=(rx0, ry0),
                downsample=(dsx, dsy),
                with_geometry=with_geometry,
                inside=(-rx0, -ry0, work_w - rx0, work_h - ry0),
            )
            parts.append(t)
        if progress is not None:
            progress(k + 1, len(cores))
    out = CellTable.concat(parts, names=names)
    out.level, out.downsample, out.px_um = level, ds, px_um
    return out


def estimate_image_stains(
    image: ImageSource, *, max_pixels: int = 4_000_000, min_od: float = 0.15
) -> StainVectors:
    """:func:`estimate_stains` on an overview of a whole image (every pixel of a small image;
    every f-th pixel per axis of a large one, so stain colours are not averaged)."""
    from simsearch_wsi.features.tiling import read_overview

    if image.n_channels != 3 or image.dtype != np.uint8:
        raise ConfigError(f"{image.path}: stain estimation needs uint8 RGB brightfield pixels")
    overview, _, _ = read_overview(image, max_pixels=max_pixels, reduce="sample")
    return estimate_stains(np.ascontiguousarray(overview[..., :3]), min_od=min_od)
