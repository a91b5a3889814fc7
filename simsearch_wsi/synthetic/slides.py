"""Seeded synthetic test data written to disk, returned together with its ground truth.

Four generators, all fast enough for unit tests and a demo:

:func:`make_synthetic_slide`
    a brightfield (H&E-like, uint8 RGB) tiled pyramidal TIFF with motifs of known classes
    stamped inside irregular tissue regions.
:func:`make_synthetic_omezarr_slide`
    the same brightfield content written as an OME-Zarr image (NGFF 0.4 or 0.5).
:func:`make_fluorescence_slide`
    a multichannel fluorescence OME-TIFF (planar CYX pages, SubIFD pyramid) with cells whose
    reporter channel is nuclear or cytoplasmic.
:func:`make_synthetic_plate`
    an OME-Zarr HCS plate (NGFF 0.4) whose fraction of reporter-positive cells rises across
    columns, like a dose response.

Every generator takes ``seed: int``; the same seed gives byte-identical pixels and identical
ground truth, different seeds differ. Independent parts of a scene (tissue shape, texture,
placement, motif shapes) draw from independent child streams of
``np.random.SeedSequence(seed)``, so changing e.g. ``n_per_class`` keeps the tissue where it was.

Coordinates of the ground truth are level-0 pixels (``_l0``), origin top-left, x right, y down.
"""

from __future__ import annotations

import csv
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import DTypeLike, NDArray
from scipy import ndimage

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0, validate_mpp
from simsearch_wsi.qupath.geojson import class_color

__all__ = [
    "CLASS_COLORS",
    "FLUORESCENCE_CLASSES",
    "MOTIF_PAINTERS",
    "MotifPainter",
    "SyntheticObject",
    "SyntheticPlate",
    "SyntheticSlide",
    "WellTruth",
    "class_color",
    "make_fluorescence_slide",
    "make_synthetic_omezarr_slide",
    "make_synthetic_plate",
    "make_synthetic_slide",
    "write_ome_zarr_image",
]

Compression = Literal["jpeg", "zlib"] | None
NgffVersion = Literal["0.4", "0.5"]

# A painter draws one motif on a square canvas of ``size_px`` pixels: it returns a float32
# (size_px, size_px, 4) array of straight (not premultiplied) RGB in 0..255 and alpha in 0..1.
# Everything drawn must lie inside the canvas' inscribed circle, so small rotations do not clip.
MotifPainter = Callable[[np.random.Generator, int], NDArray[np.float32]]

# QuPath class colours of the synthetic classes (from the one palette in qupath_geojson).
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    name: class_color(name)
    for name in ("ring", "cluster", "stripes", "nuclear_gfp", "cytoplasmic_gfp")
}

# Reporter patterns make_fluorescence_slide knows.
FLUORESCENCE_CLASSES: tuple[str, ...] = ("nuclear_gfp", "cytoplasmic_gfp")

_GLASS_RGB = (240.0, 240.0, 240.0)
_EOSIN_RGB = (234.0, 156.0, 194.0)
_NUCLEUS_TEXTURE_RGB = (150.0, 100.0, 165.0)
_MOTIF_MAX_SCALE = 1.1  # motif sizes are jittered within +-10 %
_MOTIF_MAX_ROTATION_DEG = 15.0
_GEOJSON_STREAM = 0x6E0  # child stream of the seed used for deterministic feature ids
_BACKGROUND_STREAM = 0xB6  # child stream for background boxes
_STAIN_STREAM = 0x57A  # child stream for the per-slide stain strength
_DEFAULT_CHANNEL_COLORS = {
    "R": "FF0000",
    "G": "00FF00",
    "B": "0000FF",
    "DAPI": "0000FF",
    "HOECHST": "0000FF",
    "GFP": "00FF00",
    "FITC": "00FF00",
    "CY3": "FFFF00",
    "CY5": "FF00FF",
}
_FALLBACK_CHANNEL_COLORS = ("0000FF", "00FF00", "FF00FF", "FFFF00", "00FFFF", "FF0000", "FFFFFF")


# --- ground truth ----------------------------------------------------------------------------
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


# --- small numeric helpers ------------------------------------------------------------------
def _child_rngs(seed: int, n: int) -> list[np.random.Generator]:
    """``n`` independent generators derived from ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(n)]


def _check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_levels(n_levels: int, width: int, height: int) -> int:
    n = _check_positive_int("n_levels", n_levels)
    if min(width, height) >> (n - 1) < 1:
        raise ConfigError(
            f"n_levels={n} is too many for a {width}x{height} image: the smallest level would "
            "be empty; use fewer levels"
        )
    return n


def _smooth_noise(
    rng: np.random.Generator, height: int, width: int, cell_px: int, sigma_cells: float
) -> NDArray[np.float32]:
    """Smooth random field of unit standard deviation, (height, width) float32.

    White noise on a coarse grid of ``cell_px``-pixel cells is Gaussian-blurred by
    ``sigma_cells`` cells and bilinearly upsampled; only the output is full size.
    """
    ch = max(3, -(-height // cell_px) + 1)
    cw = max(3, -(-width // cell_px) + 1)
    coarse = ndimage.gaussian_filter(rng.standard_normal((ch, cw)), sigma_cells, mode="reflect")
    coarse = (coarse - coarse.mean()) / (coarse.std() + 1e-12)
    out = ndimage.zoom(coarse.astype(np.float32), (height / ch, width / cw), order=1)
    return np.asarray(out[:height, :width], dtype=np.float32)


def _tissue_layer(
    rng: np.random.Generator, height: int, width: int, fraction: float = 0.5
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Irregular tissue regions covering about ``fraction`` of the image.

    Returns the (H, W) float32 blend weight of the tissue layer (soft edges, 0..1) and the
    (H, W) bool mask ``weight >= 0.5``.
    """
    cell = max(8, max(height, width) // 24)
    field_ = _smooth_noise(rng, height, width, cell, 1.3)
    # pull tissue away from the borders, like a section on a glass slide
    yy = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    xx = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    field_ -= 0.9 * (yy**4 + xx**4)
    field_ += 0.12 * _smooth_noise(rng, height, width, max(4, cell // 8), 1.0)  # ragged edges
    threshold = float(np.quantile(field_[::4, ::4], 1.0 - fraction))
    weight = np.clip((field_ - threshold) / 0.06 + 0.5, 0.0, 1.0, out=field_)
    return weight, weight >= 0.5


def _halve(a: NDArray[Any], y_axis: int) -> NDArray[Any]:
    """2x2 area average over axes ``y_axis, y_axis + 1`` (floor size, round half up)."""
    h, w = a.shape[y_axis] // 2, a.shape[y_axis + 1] // 2

    def part(dy: int, dx: int) -> NDArray[Any]:
        idx: list[slice] = [slice(None)] * a.ndim
        idx[y_axis] = slice(dy, 2 * h, 2)
        idx[y_axis + 1] = slice(dx, 2 * w, 2)
        return a[tuple(idx)]

    if np.issubdtype(a.dtype, np.integer) and a.dtype.itemsize <= 2:
        s: NDArray[np.uint32] = part(0, 0).astype(np.uint32)
        s += part(0, 1)
        s += part(1, 0)
        s += part(1, 1)
        s += 2
        s //= 4
        return s.astype(a.dtype)
    total: NDArray[np.float64] = part(0, 0).astype(np.float64)
    total += part(0, 1)
    total += part(1, 0)
    total += part(1, 1)
    total /= 4.0
    if np.issubdtype(a.dtype, np.integer):
        np.rint(total, out=total)
    return total.astype(a.dtype)


def _pyramid(a: NDArray[Any], n_levels: int, y_axis: int) -> list[NDArray[Any]]:
    """Level 0 plus ``n_levels - 1`` successive 2x2 area averages."""
    levels = [a]
    for _ in range(n_levels - 1):
        levels.append(_halve(levels[-1], y_axis))
    return levels


def _soft_disc(
    yy: NDArray[np.float32],
    xx: NDArray[np.float32],
    cy: float,
    cx: float,
    ry: float,
    rx: float,
    edge: float = 1.0,
) -> NDArray[np.float32]:
    """Anti-aliased filled ellipse: 1 inside, 0 outside, a ramp of about ``edge`` pixels."""
    d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) * min(ry, rx)
    return np.clip((min(ry, rx) - d) / edge + 0.5, 0.0, 1.0).astype(np.float32)


def _canvas_grid(size: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _rgba(alpha: NDArray[np.float32], rgb: Sequence[float]) -> NDArray[np.float32]:
    out = np.empty((*alpha.shape, 4), dtype=np.float32)
    out[..., :3] = np.asarray(rgb, dtype=np.float32)
    out[..., 3] = alpha
    return out


# --- brightfield motif painters -------------------------------------------------------------
def _paint_ring(rng: np.random.Generator, size_px: int) -> NDArray[np.float32]:
    """A dark purple annulus (gland-like) with a pale lumen."""
    yy, xx = _canvas_grid(size_px)
    c = (size_px - 1) / 2.0
    r_mid = 0.33 * size_px * rng.uniform(0.95, 1.05)
    half = max(1.2, 0.075 * size_px * rng.uniform(0.9, 1.1))
    squash = rng.uniform(0.85, 1.0)  # slightly elliptical
    d = np.sqrt((yy - c) ** 2 / squash**2 + (xx - c) ** 2)
    ring = np.clip(half - np.abs(d - r_mid) + 0.5, 0.0, 1.0)
    lumen = np.clip(r_mid - half - d + 0.5, 0.0, 1.0)
    rgba = np.zeros((size_px, size_px, 4), dtype=np.float32)
    ring_rgb = np.array([95.0, 35.0, 120.0], dtype=np.float32)
    lumen_rgb = np.array([246.0, 228.0, 238.0], dtype=np.float32)
    a = ring + 0.45 * lumen
    w_ring = ring / np.maximum(a, 1e-6)
    rgba[..., :3] = w_ring[..., None] * ring_rgb + (1.0 - w_ring[..., None]) * lumen_rgb
    rgba[..., 3] = np.clip(a, 0.0, 1.0)
    return rgba


def _paint_cluster(rng: np.random.Generator, size_px: int) -> NDArray[np.float32]:
    """A cluster of 5-9 small dark-blue nuclei."""
    yy, xx = _canvas_grid(size_px)
    c = (size_px - 1) / 2.0
    n = int(rng.integers(5, 10))
    r_nuc = 0.085 * size_px
    spread = 0.26 * size_px
    centers: list[tuple[float, float]] = []
    for _ in range(200):
        if len(centers) == n:
            break
        ang, rad = rng.uniform(0, 2 * np.pi), spread * math.sqrt(rng.uniform(0.0, 1.0))
        cy, cx = c + rad * math.sin(ang), c + rad * math.cos(ang)
        if all(math.hypot(cy - py, cx - px) >= 1.7 * r_nuc for py, px in centers):
            centers.append((cy, cx))
    alpha = np.zeros((size_px, size_px), dtype=np.float32)
    for cy, cx in centers:
        ry, rx = r_nuc * rng.uniform(0.8, 1.2), r_nuc * rng.uniform(0.8, 1.2)
        np.maximum(alpha, _soft_disc(yy, xx, cy, cx, ry, rx), out=alpha)
    return _rgba(0.95 * alpha, (48.0, 42.0, 140.0))


def _paint_stripes(rng: np.random.Generator, size_px: int) -> NDArray[np.float32]:
    """Three or four parallel dark pink/purple bars."""
    yy, xx = _canvas_grid(size_px)
    c = (size_px - 1) / 2.0
    n = int(rng.integers(3, 5))
    pitch = 0.19 * size_px
    half_thick = max(1.0, 0.05 * size_px * rng.uniform(0.9, 1.1))
    half_len = 0.3 * size_px
    wave = 0.03 * size_px * np.sin(xx * (2 * np.pi / (0.6 * size_px)) + rng.uniform(0, 2 * np.pi))
    alpha = np.zeros((size_px, size_px), dtype=np.float32)
    for i in range(n):
        y_i = c + (i - (n - 1) / 2.0) * pitch
        across = np.clip(half_thick - np.abs(yy - y_i - wave) + 0.5, 0.0, 1.0)
        along = np.clip(half_len - np.abs(xx - c) + 0.5, 0.0, 1.0)
        np.maximum(alpha, across * along, out=alpha)
    return _rgba(0.92 * alpha, (168.0, 42.0, 108.0))


def _paint_disc(rng: np.random.Generator, size_px: int) -> NDArray[np.float32]:
    """A look-alike of ``ring``: a filled dark purple disc of the ring's size, no lumen."""
    yy, xx = _canvas_grid(size_px)
    c = (size_px - 1) / 2.0
    r = 0.38 * size_px * rng.uniform(0.95, 1.05)
    alpha = _soft_disc(yy, xx, c, c, r * rng.uniform(0.85, 1.0), r)
    return _rgba(0.9 * alpha, (100.0, 40.0, 122.0))


def _paint_doublet(rng: np.random.Generator, size_px: int) -> NDArray[np.float32]:
    """A look-alike of ``cluster``: two or three nuclei of the cluster's colour and size."""
    yy, xx = _canvas_grid(size_px)
    c = (size_px - 1) / 2.0
    r_nuc = 0.085 * size_px
    alpha = np.zeros((size_px, size_px), dtype=np.float32)
    n = int(rng.integers(2, 4))
    phase = rng.uniform(0, 2 * np.pi)
    for k in range(n):
        ang = phase + 2 * np.pi * k / n
        cy, cx = c + 0.16 * size_px * math.sin(ang), c + 0.16 * size_px * math.cos(ang)
        np.maximum(alpha, _soft_disc(yy, xx, cy, cx, r_nuc, r_nuc), out=alpha)
    return _rgba(0.95 * alpha, (48.0, 42.0, 140.0))


def _paint_crosshatch(rng: np.random.Generator, size_px: int) -> NDArray[np.float32]:
    """A look-alike of ``stripes``: the stripes' bars crossed by as many at right angles."""
    a = _paint_stripes(rng, size_px)
    alpha = np.maximum(a[..., 3], a[..., 3].T)
    return _rgba(alpha, (168.0, 42.0, 108.0))


# Motif painters by class name; add an entry to make a new class available. The last three are
# look-alikes of the first three (distractors for evaluations: stamp them, score the others).
MOTIF_PAINTERS: dict[str, MotifPainter] = {
    "ring": _paint_ring,
    "cluster": _paint_cluster,
    "stripes": _paint_stripes,
    "disc": _paint_disc,
    "doublet": _paint_doublet,
    "crosshatch": _paint_crosshatch,
}


def _check_classes(classes: Sequence[str], known: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(classes, str):
        classes = (classes,)
    out = tuple(classes)
    if not out:
        raise ConfigError(f"classes must name at least one {what} class")
    if len(set(out)) != len(out):
        raise ConfigError(f"classes {out} contain duplicates")
    for name in out:
        if name not in known:
            raise ConfigError(
                f"unknown {what} class {name!r}; known classes: {', '.join(sorted(known))}"
            )
    return out


# --- placement ------------------------------------------------------------------------------
def _place_centers(
    rng: np.random.Generator,
    mask: NDArray[np.bool_],
    n: int,
    half_box: int,
    min_spacing: float,
    what: str,
) -> NDArray[np.int64]:
    """Random (n, 2) integer (x, y) centres whose whole box lies in ``mask``, pairwise spaced.

    The box of a centre is ``[c - half_box, c + half_box)`` on both axes. Raises
    :class:`ConfigError` when greedy random placement cannot fit ``n`` of them.
    """
    height, width = mask.shape
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    side = 2 * half_box
    if side > width or side > height:
        raise ConfigError(
            f"cannot place {what}: a {side}px box does not fit a {width}x{height} image"
        )
    integral = np.zeros((height + 1, width + 1), dtype=np.int32)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int32), axis=1, out=integral[1:, 1:])
    n_cand = max(4000, 200 * n)
    cx = rng.integers(half_box, width - half_box + 1, n_cand)
    cy = rng.integers(half_box, height - half_box + 1, n_cand)
    x0, y0, x1, y1 = cx - half_box, cy - half_box, cx + half_box, cy + half_box
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    ok = inside == side * side
    cx, cy = cx[ok], cy[ok]
    accepted = np.empty((n, 2), dtype=np.float64)
    k = 0
    spacing2 = float(min_spacing) ** 2
    for x, y in zip(cx.tolist(), cy.tolist(), strict=True):
        if k:
            d2 = (accepted[:k, 0] - x) ** 2 + (accepted[:k, 1] - y) ** 2
            if d2.min() < spacing2:
                continue
        accepted[k] = (x, y)
        k += 1
        if k == n:
            return accepted.astype(np.int64)
    raise ConfigError(
        f"cannot place {n} {what} (box {side}px, spacing {min_spacing:g}px) inside the tissue "
        f"of a {width}x{height} image (placed {k}); lower n_per_class or the motif size, or "
        "enlarge the image"
    )


def _rotate_premultiplied(rgba: NDArray[np.float32], angle_deg: float) -> NDArray[np.float32]:
    """Rotate a straight-alpha RGBA canvas; returns premultiplied RGB + alpha, same size."""
    pm = rgba.copy()
    pm[..., :3] *= rgba[..., 3:4]
    out = ndimage.rotate(pm, angle_deg, axes=(1, 0), reshape=False, order=1, mode="constant")
    out = np.asarray(out, dtype=np.float32)
    np.clip(out[..., 3], 0.0, 1.0, out=out[..., 3])
    np.clip(out[..., :3], 0.0, 255.0, out=out[..., :3])
    return out


def _composite(out: NDArray[np.uint8], x0: int, y0: int, pm: NDArray[np.float32]) -> None:
    """Alpha-composite a premultiplied RGBA patch onto ``out`` (H, W, 3) at (x0, y0), in place."""
    s_h, s_w = pm.shape[:2]
    region = out[y0 : y0 + s_h, x0 : x0 + s_w]
    a = pm[..., 3:4]
    blended = region.astype(np.float32) * (1.0 - a) + pm[..., :3]
    region[...] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)


# --- brightfield renderer -------------------------------------------------------------------
def _render_brightfield(
    *,
    width: int,
    height: int,
    classes: Sequence[str],
    n_per_class: int,
    motif_size_l0: int,
    seed: int,
    stain_jitter: float = 0.0,
) -> tuple[NDArray[np.uint8], tuple[SyntheticObject, ...], NDArray[np.bool_]]:
    """Render the H&E-like scene at level 0 (``stain_jitter``: see :func:`make_synthetic_slide`).

    Returns
    -------
    rgb_hwc
        (height, width, 3) uint8 RGB level-0 pixels.
    objects
        the motifs' tight bounding boxes (alpha > 0.1) in level-0 pixels.
    tissue_mask
        (height, width) bool, True on tissue.
    """
    width = _check_positive_int("width", width)
    height = _check_positive_int("height", height)
    classes = _check_classes(classes, tuple(MOTIF_PAINTERS), "motif")
    n_per_class = _check_positive_int("n_per_class", n_per_class, minimum=0)
    motif_size = _check_positive_int("motif_size_l0", motif_size_l0, minimum=8)
    rng_tissue, rng_texture, rng_place, rng_motif, rng_dots, rng_noise = _child_rngs(seed, 6)

    weight, tissue_mask = _tissue_layer(rng_tissue, height, width)

    # placement first: it only needs the mask
    max_side = math.ceil(motif_size * _MOTIF_MAX_SCALE) + 2
    half_box = (max_side + 1) // 2
    n_total = n_per_class * len(classes)
    centers = _place_centers(rng_place, tissue_mask, n_total, half_box, 2.0 * motif_size, "motifs")
    labels = np.repeat(np.arange(len(classes)), n_per_class)
    rng_place.shuffle(labels)

    # background: glass and eosin-pink tissue with low-frequency and fibrous texture
    low = _smooth_noise(rng_texture, height, width, max(16, motif_size * 2), 1.0)
    fib = _smooth_noise(rng_texture, height, width, 4, 0.8)
    shade = 1.0 + 0.045 * low + 0.05 * fib  # (H, W) float32
    noise = rng_noise.standard_normal((height, width), dtype=np.float32)
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    for ch in range(3):
        tissue_c = _EOSIN_RGB[ch] * shade + 3.0 * noise
        glass_c = _GLASS_RGB[ch] + 1.5 * noise
        plane = glass_c + weight * (tissue_c - glass_c)
        rgb[..., ch] = np.clip(np.rint(plane), 0, 255).astype(np.uint8)
    del low, fib, shade, noise

    # sparse pale nuclei as tissue texture, kept out of the motif boxes
    n_dots = int(tissue_mask.sum() // 1100)
    dx = rng_dots.integers(4, max(5, width - 4), n_dots)
    dy = rng_dots.integers(4, max(5, height - 4), n_dots)
    keep = tissue_mask[np.minimum(dy, height - 1), np.minimum(dx, width - 1)]
    if n_total:
        near = (np.abs(dx[:, None] - centers[None, :, 0]) < half_box + 4) & (
            np.abs(dy[:, None] - centers[None, :, 1]) < half_box + 4
        )
        keep &= ~near.any(axis=1)
    kernels = []
    kyy, kxx = _canvas_grid(9)
    for _ in range(8):
        a = _soft_disc(kyy, kxx, 4.0, 4.0, rng_dots.uniform(1.4, 2.6), rng_dots.uniform(1.4, 2.6))
        rgba = _rgba(a * rng_dots.uniform(0.35, 0.6), _NUCLEUS_TEXTURE_RGB)
        rgba[..., :3] *= rgba[..., 3:4]
        kernels.append(rgba)
    kidx = rng_dots.integers(0, len(kernels), n_dots)
    for x, y, k in zip(dx[keep].tolist(), dy[keep].tolist(), kidx[keep].tolist(), strict=True):
        if x - 4 >= 0 and x + 5 <= width and y - 4 >= 0 and y + 5 <= height:
            _composite(rgb, x - 4, y - 4, kernels[k])

    # motifs
    objects: list[SyntheticObject] = []
    for (cx, cy), label in zip(centers.tolist(), labels.tolist(), strict=True):
        name = classes[label]
        size = max(8, round(motif_size * rng_motif.uniform(0.9, 1.1)))
        canvas = np.asarray(MOTIF_PAINTERS[name](rng_motif, size), dtype=np.float32)
        if canvas.shape != (size, size, 4):
            raise ConfigError(
                f"motif painter for {name!r} returned shape {canvas.shape}, "
                f"expected ({size}, {size}, 4)"
            )
        canvas[..., :3] *= rng_motif.uniform(0.92, 1.08, 3).astype(np.float32)
        angle = rng_motif.uniform(-_MOTIF_MAX_ROTATION_DEG, _MOTIF_MAX_ROTATION_DEG)
        pm = _rotate_premultiplied(canvas, angle)
        x0, y0 = cx - size // 2, cy - size // 2
        _composite(rgb, x0, y0, pm)
        ys, xs = np.nonzero(pm[..., 3] > 0.1)
        if ys.size == 0:
            raise ConfigError(f"motif painter for {name!r} drew nothing at size {size}px")
        objects.append(
            SyntheticObject(
                class_name=name,
                x_l0=float(x0 + xs.min()),
                y_l0=float(y0 + ys.min()),
                width_l0=float(xs.max() - xs.min() + 1),
                height_l0=float(ys.max() - ys.min() + 1),
            )
        )
    if stain_jitter:
        rgb = _jitter_stain(rgb, seed, stain_jitter)
    return rgb, tuple(objects), tissue_mask


def _jitter_stain(rgb: NDArray[np.uint8], seed: int, amount: float) -> NDArray[np.uint8]:
    """Scale each channel's optical density by a per-slide factor in ``1 +- amount`` (stain
    strength and scanner colour differ between slides)."""
    if not 0 <= amount < 1:
        raise ConfigError(f"stain_jitter must be in [0, 1), got {amount}")
    gains = np.random.default_rng([seed, _STAIN_STREAM]).uniform(1 - amount, 1 + amount, 3)
    lut = np.empty((3, 256), dtype=np.uint8)
    od = -np.log(np.maximum(np.arange(256, dtype=np.float64), 0.5) / 255.0)
    for ch in range(3):
        lut[ch] = np.clip(np.rint(255.0 * np.exp(-od * gains[ch])), 0, 255).astype(np.uint8)
    out = np.empty_like(rgb)
    for ch in range(3):
        out[..., ch] = lut[ch][rgb[..., ch]]
    return out


# --- TIFF writers ---------------------------------------------------------------------------
def _check_tile(tile_size: int) -> int:
    tile = _check_positive_int("tile_size", tile_size, minimum=16)
    if tile % 16:
        raise ConfigError(f"tile_size must be a multiple of 16 (TIFF rule), got {tile}")
    return tile


def write_pyramidal_tiff(
    path: str | Path,
    rgb_hwc: NDArray[np.uint8],
    *,
    mpp: float | None,
    n_levels: int = 3,
    tile_size: int = 256,
    compression: Compression = "zlib",
) -> Path:
    """Write an (H, W, 3) uint8 image as a tiled pyramidal TIFF that tiffslide reads.

    Level 0 is the first page, levels 1.. (2x2 area averages) are its SubIFDs. The pixel size is
    written as ``XResolution``/``YResolution`` in pixels per centimetre (``1e4 / mpp`` at level 0,
    ``1e4 / (mpp * 2**k)`` at level ``k``); ``mpp=None`` writes no resolution.
    """
    import tifffile

    tile = _check_tile(tile_size)
    if compression not in ("jpeg", "zlib", None):
        raise ConfigError(f"compression must be 'jpeg', 'zlib' or None, got {compression!r}")
    rgb = np.asarray(rgb_hwc)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ConfigError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    n_levels = _check_levels(n_levels, rgb.shape[1], rgb.shape[0])
    out = Path(path)
    levels = _pyramid(rgb, n_levels, y_axis=0)
    options: dict[str, Any] = {"tile": (tile, tile)}
    if compression == "jpeg":
        # photometric "rgb" + jpeg: tifffile converts to YCbCr itself and tags the page so
        options.update(compression="jpeg", compressionargs={"level": 90}, photometric="rgb")
    elif compression == "zlib":
        options.update(compression="zlib", compressionargs={"level": 6}, photometric="rgb")
    else:
        options.update(photometric="rgb")
    with tifffile.TiffWriter(out, bigtiff=False) as tw:
        for k, lvl in enumerate(levels):
            level_opts = dict(options)
            if mpp is not None:
                res = 1e4 / (mpp * 2**k)
                level_opts.update(resolution=(res, res), resolutionunit="CENTIMETER")
            tw.write(
                lvl,
                subifds=(n_levels - 1) if k == 0 and n_levels > 1 else None,
                subfiletype=1 if k else 0,
                **level_opts,
            )
    return out


def make_synthetic_slide(
    path: str | Path,
    *,
    width: int = 2048,
    height: int = 1536,
    classes: Sequence[str] = ("ring", "cluster", "stripes"),
    n_per_class: int = 8,
    motif_size_l0: int = 48,
    mpp: float = 0.5,
    n_levels: int = 3,
    tile_size: int = 256,
    seed: int = 0,
    compression: Compression = "zlib",
    stain_jitter: float = 0.0,
) -> SyntheticSlide:
    """Write an H&E-like brightfield pyramidal TIFF with motifs of known classes.

    Parameters
    ----------
    path
        the TIFF file to write (overwritten).
    width, height
        level-0 size in pixels.
    classes
        motif classes, keys of :data:`MOTIF_PAINTERS` (``ring``, ``cluster``, ``stripes``).
    n_per_class
        motifs per class; each is stamped fully inside tissue, centres at least
        ``2 * motif_size_l0`` apart.
    motif_size_l0
        nominal motif canvas side in level-0 pixels (jittered by +-10 %).
    mpp
        level-0 micrometres per pixel.
    n_levels
        pyramid levels, downsamples 1, 2, 4, ... (2x2 area averages, floor size).
    tile_size
        TIFF tile side, a multiple of 16.
    seed
        seeds everything.
    compression
        ``"zlib"`` (lossless, default), ``"jpeg"`` (quality 90, YCbCr) or ``None``.
    stain_jitter
        per-slide stain variation: each channel's optical density is scaled by a factor drawn
        from ``1 +- stain_jitter`` (seeded); 0 (default) leaves the colours as painted.

    Returns
    -------
    SyntheticSlide
        with ``tissue_mask`` at level 0.

    Notes
    -----
    Level 0 is the first page; levels 1.. are its SubIFDs (``subfiletype=1``), so tifffile
    reads one series with ``n_levels`` levels and tiffslide reports ``level_count == n_levels``.
    The pixel size is written as TIFF ``XResolution``/``YResolution`` in pixels per centimetre
    (``ResolutionUnit = CENTIMETER``, ``1e4 / mpp`` at level 0 and ``1e4 / (mpp * 2**k)`` at
    level ``k``), which tiffslide reads back as ``tiffslide.mpp-x`` / ``tiffslide.mpp-y``.
    """
    mpp = validate_mpp(mpp, source="make_synthetic_slide")
    tile = _check_tile(tile_size)
    if compression not in ("jpeg", "zlib", None):
        raise ConfigError(f"compression must be 'jpeg', 'zlib' or None, got {compression!r}")
    n_levels = _check_levels(n_levels, width, height)
    rgb, objects, mask = _render_brightfield(
        width=width,
        height=height,
        classes=classes,
        n_per_class=n_per_class,
        motif_size_l0=motif_size_l0,
        seed=seed,
        stain_jitter=stain_jitter,
    )
    out = write_pyramidal_tiff(
        path, rgb, mpp=mpp, n_levels=n_levels, tile_size=tile, compression=compression
    )
    return SyntheticSlide(
        path=out,
        objects=objects,
        classes=tuple(classes) if not isinstance(classes, str) else (classes,),
        mpp=mpp,
        width=int(width),
        height=int(height),
        tissue_mask=mask,
        seed=int(seed),
        channel_names=("R", "G", "B"),
        n_levels=n_levels,
        format="tiff",
    )


# --- fluorescence ---------------------------------------------------------------------------
def _full_scale(dtype: np.dtype[Any]) -> float:
    if np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).max)
    if np.issubdtype(dtype, np.floating):
        return 1.0
    raise ConfigError(f"dtype must be an integer or float type, got {dtype}")


def _to_dtype(planes: NDArray[np.float32], dtype: np.dtype[Any]) -> NDArray[Any]:
    """Convert intensities in 0..1 of full scale to ``dtype`` (clipped, rounded for integers)."""
    scale = _full_scale(dtype)
    if np.issubdtype(dtype, np.integer):
        scaled: NDArray[np.float32] = np.clip(np.rint(planes * scale), 0, scale)
        return scaled.astype(dtype)
    clipped: NDArray[np.float32] = np.clip(planes, 0.0, 1.0)
    return clipped.astype(dtype)


def _stamp_cell(
    planes: NDArray[np.float32],
    cx: float,
    cy: float,
    r_nuc: float,
    r_cell: float,
    rng: np.random.Generator,
    reporter: Literal["none", "nuclear", "cytoplasmic"],
) -> None:
    """Add one cell to (C, H, W) float planes (channel 0 nuclei, 1 reporter, 2.. membrane)."""
    _, height, width = planes.shape
    pad = math.ceil(r_cell) + 2
    x0, y0 = max(0, int(cx) - pad), max(0, int(cy) - pad)
    x1, y1 = min(width, int(cx) + pad + 1), min(height, int(cy) + pad + 1)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    ry, rx = r_nuc * rng.uniform(0.85, 1.15), r_nuc * rng.uniform(0.85, 1.15)
    nucleus = _soft_disc(yy, xx, cy, cx, ry, rx)
    texture = 1.0 + 0.12 * rng.standard_normal(nucleus.shape).astype(np.float32)
    planes[0, y0:y1, x0:x1] += rng.uniform(0.35, 0.6) * nucleus * texture
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    if reporter == "nuclear":
        planes[1, y0:y1, x0:x1] += rng.uniform(0.4, 0.6) * nucleus
    elif reporter == "cytoplasmic":
        r_in = max(ry, rx) + 1.0
        cyto = np.clip(np.minimum(d - r_in, r_cell - 1.0 - d) + 0.5, 0.0, 1.0)
        planes[1, y0:y1, x0:x1] += rng.uniform(0.3, 0.5) * cyto
    if planes.shape[0] > 2:
        membrane = np.clip(1.2 - np.abs(d - r_cell), 0.0, 1.0)
        planes[2:, y0:y1, x0:x1] += rng.uniform(0.04, 0.08) * membrane


def _cell_grid(
    rng: np.random.Generator, height: int, width: int, pitch: float, margin: float
) -> NDArray[np.float64]:
    """Jittered-grid (n, 2) cell centres (x, y), at least ``margin`` from the image border."""
    xs = np.arange(margin, width - margin, pitch)
    ys = np.arange(margin, height - margin, pitch)
    gx, gy = np.meshgrid(xs, ys)
    pts = np.stack([gx.ravel(), gy.ravel()], axis=1)
    pts += rng.uniform(-0.2 * pitch, 0.2 * pitch, pts.shape)
    np.clip(pts[:, 0], margin, width - 1 - margin, out=pts[:, 0])
    np.clip(pts[:, 1], margin, height - 1 - margin, out=pts[:, 1])
    return pts


def _background_planes(
    rng: np.random.Generator, n_channels: int, height: int, width: int, level: float
) -> NDArray[np.float32]:
    planes = np.empty((n_channels, height, width), dtype=np.float32)
    for c in range(n_channels):
        planes[c] = level + 0.004 * rng.standard_normal((height, width), dtype=np.float32)
    return planes


def _write_ome_tiff(
    path: Path,
    levels: list[NDArray[Any]],
    *,
    mpp: float,
    channel_names: Sequence[str],
    tile: int,
    file_uuid: str,
) -> None:
    import tifffile

    metadata: dict[str, Any] = {
        "UUID": f"urn:uuid:{file_uuid}",  # tifffile's default is a time-based uuid1
        "axes": "CYX",
        "Channel": {"Name": list(channel_names)},
        "PhysicalSizeX": mpp,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": mpp,
        "PhysicalSizeYUnit": "µm",
    }
    n_levels = len(levels)
    with tifffile.TiffWriter(path, bigtiff=False, ome=True) as tw:
        for k, lvl in enumerate(levels):
            res = 1e4 / (mpp * 2**k)
            tw.write(
                lvl,
                subifds=(n_levels - 1) if k == 0 and n_levels > 1 else None,
                subfiletype=1 if k else 0,
                metadata=metadata if k == 0 else None,
                photometric="minisblack",
                tile=(tile, tile),
                compression="zlib",
                compressionargs={"level": 6},
                resolution=(res, res),
                resolutionunit="CENTIMETER",
            )


def make_fluorescence_slide(
    path: str | Path,
    *,
    width: int = 1024,
    height: int = 768,
    channels: Sequence[str] = ("DAPI", "GFP", "Cy5"),
    classes: Sequence[str] = ("nuclear_gfp", "cytoplasmic_gfp"),
    n_per_class: int = 8,
    mpp: float = 0.65,
    n_levels: int = 2,
    dtype: DTypeLike = np.uint16,
    seed: int = 0,
    tile_size: int = 256,
) -> SyntheticSlide:
    """Write a multichannel fluorescence OME-TIFF with cells whose reporter is localised.

    Channel roles are positional: ``channels[0]`` holds the nuclei (DAPI-like) of every cell in
    the tissue region, ``channels[1]`` the reporter (GFP-like), any further channels a weak
    membrane stain (Cy5-like). Only the objects carry reporter signal: ``nuclear_gfp`` cells
    have it on the nucleus, ``cytoplasmic_gfp`` cells in a ring around it. Each object's box
    is its cell (nucleus plus cytoplasm). Intensities are fractions of the dtype's full scale
    (background ~1.5 %, nuclei 35-60 %).

    The file holds one OME series, axes ``CYX`` (one tiled zlib page per channel), levels
    1.. as SubIFDs (2x2 area averages). The OME-XML carries the channel names and
    ``PhysicalSizeX/Y`` (µm); the TIFF resolution tags carry the pixel size too (pixels per
    centimetre), which is what tiffslide reads.
    """
    out = Path(path)
    mpp = validate_mpp(mpp, source="make_fluorescence_slide")
    width = _check_positive_int("width", width)
    height = _check_positive_int("height", height)
    n_levels = _check_levels(n_levels, width, height)
    tile = _check_tile(tile_size)
    channel_names = (channels,) if isinstance(channels, str) else tuple(channels)
    if len(channel_names) < 2 or len(set(channel_names)) != len(channel_names):
        raise ConfigError(
            f"channels must be at least 2 distinct names (nuclei, reporter, ...), got "
            f"{channel_names}"
        )
    classes = _check_classes(classes, FLUORESCENCE_CLASSES, "fluorescence")
    n_per_class = _check_positive_int("n_per_class", n_per_class, minimum=0)
    np_dtype = np.dtype(dtype)
    _full_scale(np_dtype)
    rng_tissue, rng_cells, rng_pick, rng_paint, rng_noise = _child_rngs(seed, 5)

    weight, mask = _tissue_layer(rng_tissue, height, width)
    r_nuc, r_cell = 6.0, 11.0
    pitch = 2.0 * r_cell + 4.0
    pts = _cell_grid(rng_cells, height, width, pitch, margin=r_cell + 2)
    pts_i = np.rint(pts).astype(np.int64)
    in_tissue = mask[pts_i[:, 1], pts_i[:, 0]]
    pts = pts[in_tissue]

    # choose the objects among the cells, spaced by two cell boxes
    n_total = n_per_class * len(classes)
    box = 2 * math.ceil(r_cell) + 2
    order = rng_pick.permutation(len(pts))
    chosen: list[int] = []
    for i in order.tolist():
        if len(chosen) == n_total:
            break
        if all(np.hypot(*(pts[i] - pts[j])) >= 2 * box for j in chosen):
            chosen.append(i)
    if len(chosen) < n_total:
        raise ConfigError(
            f"cannot place {n_total} fluorescence objects (cell box {box}px, spacing {2 * box}px) "
            f"among {len(pts)} cells of a {width}x{height} image (placed {len(chosen)}); lower "
            "n_per_class or enlarge the image"
        )
    labels = np.repeat(np.arange(len(classes)), n_per_class)
    rng_pick.shuffle(labels)
    reporter_of = dict(zip(chosen, labels.tolist(), strict=True))

    planes = _background_planes(rng_noise, len(channel_names), height, width, 0.012)
    planes[1:] += 0.006 * weight  # weak tissue autofluorescence
    objects: list[SyntheticObject] = []
    for i, (cx, cy) in enumerate(pts.tolist()):
        label = reporter_of.get(i)
        mode: Literal["none", "nuclear", "cytoplasmic"] = "none"
        if label is not None:
            mode = "nuclear" if classes[label] == "nuclear_gfp" else "cytoplasmic"
            bx0, by0 = math.floor(cx - r_cell), math.floor(cy - r_cell)
            objects.append(
                SyntheticObject(
                    class_name=classes[label],
                    x_l0=float(bx0),
                    y_l0=float(by0),
                    width_l0=float(math.ceil(cx + r_cell) - bx0),
                    height_l0=float(math.ceil(cy + r_cell) - by0),
                )
            )
        _stamp_cell(planes, cx, cy, r_nuc, r_cell, rng_paint, mode)
    data = _to_dtype(planes, np_dtype)
    del planes
    _write_ome_tiff(
        out,
        _pyramid(data, n_levels, y_axis=1),
        mpp=mpp,
        channel_names=channel_names,
        tile=tile,
        file_uuid=str(uuid.UUID(bytes=rng_pick.bytes(16), version=4)),
    )
    return SyntheticSlide(
        path=out,
        objects=tuple(objects),
        classes=classes,
        mpp=mpp,
        width=width,
        height=height,
        tissue_mask=mask,
        seed=int(seed),
        channel_names=channel_names,
        n_levels=n_levels,
        format="ome-tiff",
    )


# --- OME-Zarr -------------------------------------------------------------------------------
def _channel_color(name: str, index: int) -> str:
    return _DEFAULT_CHANNEL_COLORS.get(
        name.upper(), _FALLBACK_CHANNEL_COLORS[index % len(_FALLBACK_CHANNEL_COLORS)]
    )


def _omero(channel_names: Sequence[str], dtype: np.dtype[Any]) -> dict[str, Any]:
    if np.issubdtype(dtype, np.integer):
        lo, hi = float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
    else:
        lo, hi = 0.0, 1.0
    return {
        "channels": [
            {
                "label": name,
                "color": _channel_color(name, i),
                "active": True,
                "coefficient": 1.0,
                "family": "linear",
                "inverted": False,
                "window": {"min": lo, "max": hi, "start": lo, "end": hi},
            }
            for i, name in enumerate(channel_names)
        ],
        "rdefs": {"model": "color", "defaultT": 0, "defaultZ": 0},
    }


def _multiscale(version: NgffVersion, n_levels: int, mpp: float, name: str) -> dict[str, Any]:
    ms: dict[str, Any] = {
        "name": name,
        "axes": [
            {"name": "c", "type": "channel"},
            {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"},
        ],
        "datasets": [
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, mpp * 2**k, mpp * 2**k]}
                ],
            }
            for k in range(n_levels)
        ],
        "type": "mean",
        "metadata": {"method": "2x2 area average", "description": "simsearch_wsi.synthetic.slides"},
    }
    if version == "0.4":
        ms = {"version": "0.4", **ms}
    return ms


def _write_multiscale_group(
    group: Any,
    levels: list[NDArray[Any]],
    *,
    version: NgffVersion,
    mpp: float,
    channel_names: Sequence[str],
    chunk: int,
    name: str,
) -> None:
    """Write CYX ``levels`` as arrays "0", "1", ... of ``group`` plus the image metadata.

    0.4: Zarr v2 arrays, Blosc-LZ4 compression, "/" dimension separator, metadata in
    ``.zattrs``. 0.5: Zarr v3 arrays with Blosc-LZ4 and ``dimension_names`` c, y, x, metadata
    under the ``ome`` key of the group attributes.
    """
    import numcodecs
    import zarr.codecs

    for k, lvl in enumerate(levels):
        chunks = (lvl.shape[0], min(chunk, lvl.shape[1]), min(chunk, lvl.shape[2]))
        if version == "0.4":
            arr = group.create_array(
                str(k),
                shape=lvl.shape,
                chunks=chunks,
                dtype=lvl.dtype,
                compressors=numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
                chunk_key_encoding={"name": "v2", "separator": "/"},
                fill_value=0,
            )
        else:
            arr = group.create_array(
                str(k),
                shape=lvl.shape,
                chunks=chunks,
                dtype=lvl.dtype,
                compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
                dimension_names=("c", "y", "x"),
                fill_value=0,
            )
        arr[...] = lvl
    multiscales = [_multiscale(version, len(levels), mpp, name)]
    omero = _omero(channel_names, levels[0].dtype)
    if version == "0.4":
        group.attrs.update({"multiscales": multiscales, "omero": {"version": "0.4", **omero}})
    else:
        group.attrs.update({"ome": {"version": "0.5", "multiscales": multiscales, "omero": omero}})


def _check_version(version: str) -> NgffVersion:
    if version == "0.4":
        return "0.4"
    if version == "0.5":
        return "0.5"
    raise ConfigError(f"OME-Zarr version must be '0.4' or '0.5', got {version!r}")


def write_ome_zarr_image(
    path: str | Path,
    array_cyx: NDArray[Any],
    *,
    mpp: float,
    channel_names: Sequence[str],
    version: NgffVersion = "0.4",
    n_levels: int = 2,
    chunk: int = 256,
) -> Path:
    """Write a (C, Y, X) array as a multiscale OME-Zarr image (replacing ``path``).

    Parameters
    ----------
    path
        the image group folder, e.g. ``image.ome.zarr``.
    array_cyx
        level-0 pixels, (C, Y, X).
    mpp
        level-0 micrometres per pixel; level ``k`` gets scale ``mpp * 2**k`` on y and x.
    channel_names
        one label per channel, written to ``omero.channels[].label``.
    version
        ``"0.4"``: NGFF 0.4 on Zarr v2 (Blosc-LZ4, "/" chunk keys, metadata in ``.zattrs``);
        ``"0.5"``: NGFF 0.5 on Zarr v3 (Blosc-LZ4, ``dimension_names``, metadata under
        ``attributes.ome`` in ``zarr.json``).
    n_levels
        pyramid levels at paths ``"0"``, ``"1"``, ... (2x2 area averages, floor size).
    chunk
        chunk side in y and x; each chunk holds all channels.
    """
    import zarr

    ver = _check_version(version)
    arr = np.asarray(array_cyx)
    if arr.ndim != 3 or 0 in arr.shape:
        raise ConfigError(f"array_cyx must be a non-empty (C, Y, X) array, got {arr.shape}")
    names = (channel_names,) if isinstance(channel_names, str) else tuple(channel_names)
    if len(names) != arr.shape[0]:
        raise ConfigError(f"{len(names)} channel names for {arr.shape[0]} channels")
    mpp = validate_mpp(mpp, source=str(path))
    n_levels = _check_levels(n_levels, arr.shape[2], arr.shape[1])
    chunk = _check_positive_int("chunk", chunk)
    out = Path(path)
    root = zarr.open_group(out, mode="w", zarr_format=2 if ver == "0.4" else 3)
    _write_multiscale_group(
        root,
        _pyramid(arr, n_levels, y_axis=1),
        version=ver,
        mpp=mpp,
        channel_names=names,
        chunk=chunk,
        name=out.name,
    )
    return out


def make_synthetic_omezarr_slide(
    path: str | Path,
    *,
    version: NgffVersion = "0.4",
    width: int = 2048,
    height: int = 1536,
    classes: Sequence[str] = ("ring", "cluster", "stripes"),
    n_per_class: int = 8,
    motif_size_l0: int = 48,
    mpp: float = 0.5,
    n_levels: int = 3,
    chunk: int = 256,
    seed: int = 0,
) -> SyntheticSlide:
    """The brightfield scene of :func:`make_synthetic_slide` as an OME-Zarr image.

    Same seed and parameters give the same level-0 pixels and ground truth as the TIFF
    (uncompressed or zlib). Axes c, y, x; 3 uint8 channels labelled R, G, B. See
    :func:`write_ome_zarr_image` for the layout of each version.
    """
    ver = _check_version(version)
    mpp = validate_mpp(mpp, source="make_synthetic_omezarr_slide")
    n_levels = _check_levels(n_levels, width, height)
    rgb, objects, mask = _render_brightfield(
        width=width,
        height=height,
        classes=classes,
        n_per_class=n_per_class,
        motif_size_l0=motif_size_l0,
        seed=seed,
    )
    out = write_ome_zarr_image(
        path,
        np.ascontiguousarray(np.moveaxis(rgb, 2, 0)),
        mpp=mpp,
        channel_names=("R", "G", "B"),
        version=ver,
        n_levels=n_levels,
        chunk=chunk,
    )
    return SyntheticSlide(
        path=out,
        objects=objects,
        classes=tuple(classes) if not isinstance(classes, str) else (classes,),
        mpp=mpp,
        width=int(width),
        height=int(height),
        tissue_mask=mask,
        seed=int(seed),
        channel_names=("R", "G", "B"),
        n_levels=n_levels,
        format=f"ome-zarr-{ver}",
    )


# --- HCS plate ------------------------------------------------------------------------------
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
    written like :func:`write_ome_zarr_image`).

    Every field is covered by cells (nuclei in ``channels[0]``); a fraction of them carry a
    nuclear reporter in ``channels[1]``. The target fraction rises linearly from 0.1 in the
    first column to 0.9 in the last (0.5 for one column); each field gets exactly
    ``round(target * n_cells)`` positives, and the realised fraction is the ground truth.
    """
    import zarr

    if version != "0.4":
        raise ConfigError(f"plates are written as OME-Zarr 0.4 only, got version {version!r}")
    row_names = (rows,) if isinstance(rows, str) else tuple(rows)
    col_names = (columns,) if isinstance(columns, str) else tuple(columns)
    for kind, names in (("row", row_names), ("column", col_names)):
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"plate {kind} names must be non-empty and unique, got {names}")
        for n in names:
            if not n or not n.isascii() or not n.isalnum():
                raise ConfigError(f"plate {kind} name {n!r} must be ASCII letters/digits only")
    n_fields = _check_positive_int("fields_per_well", fields_per_well)
    size = _check_positive_int("field_size", field_size, minimum=32)
    channel_names = (channels,) if isinstance(channels, str) else tuple(channels)
    if len(channel_names) < 2 or len(set(channel_names)) != len(channel_names):
        raise ConfigError(
            f"channels must be at least 2 distinct names (nuclei, reporter, ...), got "
            f"{channel_names}"
        )
    mpp = validate_mpp(mpp, source="make_synthetic_plate")
    _child_rngs(seed, 1)  # validates the seed
    out = Path(path)
    root = zarr.open_group(out, mode="w", zarr_format=2)
    root.attrs["plate"] = {
        "version": "0.4",
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
            well_group.attrs["well"] = {
                "version": "0.4",
                "images": [{"path": str(f), "acquisition": 0} for f in range(n_fields)],
            }
            field_rngs = [
                np.random.default_rng(s) for s in well_seqs[i * len(col_names) + j].spawn(n_fields)
            ]
            cells_per_field: list[tuple[tuple[float, float, bool], ...]] = []
            for f, rng in enumerate(field_rngs):
                pts = _cell_grid(rng, size, size, pitch, margin=r_cell)
                n_pos = round(targets[j] * len(pts))
                positive = np.zeros(len(pts), dtype=bool)
                positive[rng.permutation(len(pts))[:n_pos]] = True
                planes = _background_planes(rng, len(channel_names), size, size, 0.01)
                for (cx, cy), pos in zip(pts.tolist(), positive.tolist(), strict=True):
                    _stamp_cell(planes, cx, cy, r_nuc, r_cell, rng, "nuclear" if pos else "none")
                data = _to_dtype(planes, np.dtype(np.uint16))
                _write_multiscale_group(
                    well_group.create_group(str(f)),
                    _pyramid(data, n_levels, y_axis=1),
                    version="0.4",
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
