"""Numbers per image for a study: class areas, area fractions, densities and DAB intensity.

Everything is measured on a grid (a segmentation's label mask, with a foreground mask and the
brightfield pixels resampled to the same grid) whose pixels cover ``downsample_x x
downsample_y`` level-0 pixels each; areas go to level-0 pixels^2 and, with the level-0 pixel
size ``mpp``, to micrometres^2. Tables are written as CSV, atomically.
"""

from __future__ import annotations

import csv
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.atomic import atomic_path
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import validate_mpp

__all__ = ["ClassStats", "dab_od", "region_stats", "stats_rows", "write_table"]

# rows of the RGB image deconvolved at once (bounds the float64 temporaries of rgb2hed)
_DAB_CHUNK_ROWS = 512


@dataclass(frozen=True)
class ClassStats:
    """Measurements of one class on one image.

    Attributes
    ----------
    class_name
        The class, as QuPath shows it.
    n_detections
        Detections of this class (0 when no counts were given).
    density_per_mm2
        Detections per mm^2 of foreground (of the whole grid without a foreground mask); None
        without ``mpp``, without detection counts, or when the foreground is empty.
    area_um2
        Area of the class' pixels in micrometres^2; None without ``mpp``.
    area_px_l0
        Area of the class' pixels in level-0 pixels^2.
    fraction_of_foreground
        Area of the class' pixels inside the foreground / area of the foreground (0..1); None
        without a foreground mask or when it is empty.
    mean_dab_od
        Mean DAB optical density (:func:`dab_od`) over the class' pixels; None without RGB
        pixels or when the class has no pixels.
    """

    class_name: str
    n_detections: int
    density_per_mm2: float | None
    area_um2: float | None
    area_px_l0: float
    fraction_of_foreground: float | None
    mean_dab_od: float | None


def _check_rgb(rgb: Any, shape: tuple[int, ...] | None = None) -> NDArray[np.uint8]:
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ConfigError(f"rgb must be an (H, W, 3) array, got shape {arr.shape}")
    if shape is not None and arr.shape[:2] != shape:
        raise ConfigError(
            f"rgb is {arr.shape[0]} x {arr.shape[1]} but labels are {shape[0]} x {shape[1]}; "
            "resample them to the same grid"
        )
    if arr.dtype != np.uint8:
        raise ConfigError(
            f"rgb must be uint8 brightfield pixels, got dtype {arr.dtype}; convert it with "
            "skimage.util.img_as_ubyte"
        )
    return arr


def dab_od(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    """DAB channel of an H-DAB colour deconvolution of brightfield pixels.

    Parameters
    ----------
    rgb
        (H, W, 3) uint8 brightfield RGB pixels (any grid).

    Returns
    -------
    ndarray of float32
        (H, W) DAB stain amount from :func:`skimage.color.rgb2hed`: an optical density in that
        function's units (natural-log OD divided by ``-log(1e-6)``, about 13.8; clipped at 0).
        0 on white or unstained pixels, larger for browner; ``hed2rgb`` inverts it.
    """
    from skimage.color import rgb2hed

    arr = _check_rgb(rgb)
    out = np.empty(arr.shape[:2], dtype=np.float32)
    for r0 in range(0, arr.shape[0], _DAB_CHUNK_ROWS):
        block = arr[r0 : r0 + _DAB_CHUNK_ROWS]
        out[r0 : r0 + block.shape[0]] = rgb2hed(block)[..., 2]
    return out


def _positive_pair(value: Any, name: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a pair of numbers (x, y), got {value!r}") from exc
    if not (math.isfinite(x) and math.isfinite(y)) or min(x, y) <= 0:
        raise ConfigError(f"{name} must be two positive finite numbers (x, y), got {value!r}")
    return x, y


def region_stats(
    labels: NDArray[np.integer[Any]],
    *,
    classes: Sequence[str],
    downsample: tuple[float, float],
    mpp: float | None,
    foreground: NDArray[np.bool_] | None = None,
    detections_per_class: Mapping[str, int] | None = None,
    rgb: NDArray[np.uint8] | None = None,
) -> list[ClassStats]:
    """Per-class areas, area fractions, detection densities and mean DAB of one image.

    Parameters
    ----------
    labels
        (H, W) integer segmentation on a grid; 0 = unclassified, ``k`` = ``classes[k - 1]``.
    classes
        Class names of labels 1..n (unique, non-empty).
    downsample
        ``(x, y)`` level-0 pixels per grid pixel; a grid pixel is ``downsample_x *
        downsample_y`` level-0 pixels^2.
    mpp
        Level-0 micrometres per pixel, or None when unknown (then ``area_um2`` and
        ``density_per_mm2`` are None).
    foreground
        (H, W) bool tissue/foreground mask on the same grid, or None.
    detections_per_class
        Class name -> number of detections (e.g. cells) on the image; missing classes count 0.
        Density is per mm^2 of foreground, or of the whole grid when ``foreground`` is None.
    rgb
        (H, W, 3) uint8 brightfield pixels on the same grid, for ``mean_dab_od``.

    Returns
    -------
    list of ClassStats
        One per class, in the order of ``classes``.

    Raises
    ------
    ConfigError
        Shapes that differ, label values without a class, duplicate or empty class names,
        detection counts for unknown classes or negative ones, a bad downsample or ``mpp``.
    """
    lab = np.asarray(labels)
    if lab.ndim != 2 or lab.size == 0:
        raise ConfigError(f"labels must be a non-empty 2-D (H, W) array, got shape {lab.shape}")
    if lab.dtype.kind not in "biu":
        raise ConfigError(f"labels must hold integers, got dtype {lab.dtype}; cast them first")
    names = list(classes)
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"classes must be unique non-empty names, got {names!r}")
    lo, hi = int(lab.min()), int(lab.max())
    if lo < 0 or hi > len(names):
        bad = lo if lo < 0 else hi
        raise ConfigError(
            f"label value {bad} has no class: {len(names)} class names cover labels "
            f"1..{len(names)} (0 = unclassified)"
        )
    dsx, dsy = _positive_pair(downsample, "downsample")
    mpp_v = None if mpp is None else validate_mpp(mpp, source="region_stats")
    px_area_l0 = dsx * dsy
    counts = np.bincount(lab.ravel().astype(np.intp), minlength=len(names) + 1)

    fg_inside: NDArray[np.int64] | None = None
    if foreground is not None:
        fg = np.asarray(foreground)
        if fg.shape != lab.shape:
            raise ConfigError(
                f"foreground is {fg.shape} but labels are {lab.shape}; use the same grid"
            )
        fg = fg.astype(bool, copy=False)
        fg_pixels = int(fg.sum())
        fg_inside = np.bincount(lab[fg].astype(np.intp), minlength=len(names) + 1)
    else:
        fg_pixels = lab.size
    density_area_mm2 = None
    if mpp_v is not None and fg_pixels > 0:
        density_area_mm2 = fg_pixels * px_area_l0 * mpp_v * mpp_v * 1e-6

    dets = dict(detections_per_class or {})
    unknown = sorted(set(dets) - set(names))
    if unknown:
        raise ConfigError(f"detection counts for unknown classes {unknown}; classes are {names}")
    for name, n in dets.items():
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or int(n) < 0:
            raise ConfigError(f"detections of {name!r} must be a count >= 0, got {n!r}")

    dab_sum: NDArray[np.float64] | None = None
    if rgb is not None:
        arr = _check_rgb(rgb, lab.shape)
        dab_sum = np.zeros(len(names) + 1, dtype=np.float64)
        for r0 in range(0, arr.shape[0], _DAB_CHUNK_ROWS):
            block = dab_od(arr[r0 : r0 + _DAB_CHUNK_ROWS])
            rows = lab[r0 : r0 + block.shape[0]].ravel().astype(np.intp)
            dab_sum += np.bincount(rows, weights=block.ravel(), minlength=len(names) + 1)

    out = []
    for k, name in enumerate(names, start=1):
        n_px = int(counts[k])
        area_l0 = n_px * px_area_l0
        n_det = int(dets.get(name, 0))
        out.append(
            ClassStats(
                class_name=name,
                n_detections=n_det,
                density_per_mm2=(
                    None
                    if density_area_mm2 is None or detections_per_class is None
                    else n_det / density_area_mm2
                ),
                area_um2=None if mpp_v is None else area_l0 * mpp_v * mpp_v,
                area_px_l0=float(area_l0),
                fraction_of_foreground=(
                    None if fg_inside is None or fg_pixels == 0 else float(fg_inside[k]) / fg_pixels
                ),
                mean_dab_od=(None if dab_sum is None or n_px == 0 else float(dab_sum[k] / n_px)),
            )
        )
    return out


def stats_rows(
    image: str,
    stats: Sequence[ClassStats],
    *,
    extra: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Table rows (one per class) for :func:`write_table`.

    Parameters
    ----------
    image
        The image's name or identifier (first column, ``image``).
    stats
        What :func:`region_stats` returned for the image.
    extra
        Columns placed after ``image`` and before the statistics, e.g. a plate's ``well``,
        ``row``, ``column``, ``field``.

    Returns
    -------
    list of dict
        ``{"image", *extra, *ClassStats fields}`` per class.

    Raises
    ------
    ConfigError
        An ``extra`` column named like ``image`` or a statistic.
    """
    extra = dict(extra or {})
    taken = {"image"} | {f.name for f in fields(ClassStats)}
    clash = sorted(taken & set(extra))
    if clash:
        raise ConfigError(f"extra columns {clash} clash with the statistics' columns; rename them")
    return [{"image": image, **extra, **asdict(s)} for s in stats]


def _cell(value: Any) -> Any:
    """A CSV cell: None and non-finite numbers empty, floats to 6 significant digits."""
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return f"{f:.6g}" if math.isfinite(f) else ""
    return value


def write_table(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write rows as a CSV table with a header, atomically.

    Parameters
    ----------
    path
        The ``.csv`` file to write (replaced only once the new table is complete).
    rows
        Mappings of column -> value. Columns appear in first-seen order over all rows; a row
        without a column gets an empty cell. None and non-finite numbers are written as empty
        cells, floats with 6 significant digits, integers exactly.

    Returns
    -------
    Path
        The path written.

    Raises
    ------
    ConfigError
        No rows, or a column name that is not a non-empty string.
    """
    if not rows:
        raise ConfigError(f"{path}: no rows to write; quantify at least one image first")
    columns: dict[str, None] = {}
    for row in rows:
        for key in row:
            if not isinstance(key, str) or not key:
                raise ConfigError(f"{path}: column names must be non-empty strings, got {key!r}")
            columns.setdefault(key, None)
    header = list(columns)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in header])
    return Path(path)
