"""Tiles for fully-convolutional work, and bounded-memory overview reads.

A level is cut into a row-major grid of **core** regions that partition it exactly (edge tiles
are smaller). Each tile is read with a **halo** of context on every side, so a fully
convolutional network sees valid context at the core's border; the halo may extend outside the
image, where :meth:`ImageSource.read_region` pads with the image's fill value. After the network
has run, the core is cut back out of the output with :meth:`Tile.core_slice_in_read` and the
cores are placed side by side (:func:`stitch`).

Frames: ``_lvl`` is pixels of the tile's pyramid level, ``_l0`` level-0 pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError, RegionError
from simsearch_wsi.core.geometry import lvl_to_l0_location

if TYPE_CHECKING:
    from simsearch_wsi.features.tissue import TissueMask
    from simsearch_wsi.io.base import ImageSource, LevelInfo

# Rows of a large level are read in bands of about this many pixels (see read_overview).
_BAND_PIXELS = 1 << 24


@dataclass(frozen=True)
class Tile:
    """One tile of a level: a core region that partitions the level, read with a halo.

    Attributes
    ----------
    level
        pyramid level the tile belongs to.
    x_lvl, y_lvl
        top-left corner of the core, in pixels of ``level``.
    width_lvl, height_lvl
        size of the core, in pixels of ``level``.
    halo_lvl
        context added on every side of the core when reading, in pixels of ``level``.
    """

    level: int
    x_lvl: int
    y_lvl: int
    width_lvl: int
    height_lvl: int
    halo_lvl: int

    # --- read region (core grown by the halo; may extend outside the image) ----------------
    @property
    def read_x_lvl(self) -> int:
        """Left edge of the read region in level pixels (negative when the halo sticks out)."""
        return self.x_lvl - self.halo_lvl

    @property
    def read_y_lvl(self) -> int:
        """Top edge of the read region in level pixels (negative when the halo sticks out)."""
        return self.y_lvl - self.halo_lvl

    @property
    def read_width_lvl(self) -> int:
        return self.width_lvl + 2 * self.halo_lvl

    @property
    def read_height_lvl(self) -> int:
        return self.height_lvl + 2 * self.halo_lvl

    @property
    def read_size_lvl(self) -> tuple[int, int]:
        """(width, height) of the read region in level pixels, as ``read_region`` takes it."""
        return (self.read_width_lvl, self.read_height_lvl)

    @property
    def core_area_lvl(self) -> int:
        return self.width_lvl * self.height_lvl

    def read_location_l0(self, image: ImageSource) -> tuple[int, int]:
        """Level-0 (x, y) of the read region's top-left corner, for ``image.read_region``.

        Uses the level's per-axis downsample and is exact for non-integer downsamples:
        ``read_region`` maps the returned location back to ``(read_x_lvl, read_y_lvl)``.
        """
        lv = _level_info(image, self.level)
        return (
            lvl_to_l0_location(self.read_x_lvl, lv.downsample_x),
            lvl_to_l0_location(self.read_y_lvl, lv.downsample_y),
        )

    def core_slice_in_read(self) -> tuple[slice, slice]:
        """(slice_y, slice_x) of the core inside the (H_read, W_read, ...) read array."""
        h = self.halo_lvl
        return (slice(h, h + self.height_lvl), slice(h, h + self.width_lvl))

    def core_slice_in_level(self) -> tuple[slice, slice]:
        """(slice_y, slice_x) of the core inside the whole level's (H, W, ...) array."""
        return (
            slice(self.y_lvl, self.y_lvl + self.height_lvl),
            slice(self.x_lvl, self.x_lvl + self.width_lvl),
        )

    def core_box_l0(self, image: ImageSource) -> tuple[float, float, float, float]:
        """The core as (x_l0, y_l0, width_l0, height_l0), using the level's per-axis downsample."""
        lv = _level_info(image, self.level)
        return (
            self.x_lvl * lv.downsample_x,
            self.y_lvl * lv.downsample_y,
            self.width_lvl * lv.downsample_x,
            self.height_lvl * lv.downsample_y,
        )


def _check_int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _level_info(image: ImageSource, level: int) -> LevelInfo:
    if isinstance(level, bool) or not isinstance(level, int | np.integer):
        raise RegionError(f"{image.path}: level must be an integer, got {level!r}")
    if not 0 <= level < image.level_count:
        raise RegionError(
            f"{image.path}: level {level} does not exist; the image has levels "
            f"0..{image.level_count - 1}"
        )
    return image.levels[int(level)]


def tile_grid(
    level_width: int,
    level_height: int,
    *,
    tile_size: int,
    halo: int,
    level: int = 0,
) -> list[Tile]:
    """Cut a level into a row-major grid of tiles whose cores partition it exactly.

    Parameters
    ----------
    level_width, level_height
        size of the level in its own pixels.
    tile_size
        core side in level pixels (> 0); the last column/row of tiles is narrower/shorter when
        the level is not a multiple of ``tile_size``.
    halo
        context in level pixels added on every side of each core when reading (>= 0).
    level
        pyramid level recorded on the tiles.

    Returns
    -------
    list[Tile]
        row-major (y outer, x inner); cores never overlap and cover the level exactly.
    """
    width = _check_int(level_width, "level_width", minimum=1)
    height = _check_int(level_height, "level_height", minimum=1)
    size = _check_int(tile_size, "tile_size", minimum=1)
    halo_lvl = _check_int(halo, "halo", minimum=0)
    lvl = _check_int(level, "level", minimum=0)
    tiles: list[Tile] = []
    for y in range(0, height, size):
        for x in range(0, width, size):
            tiles.append(
                Tile(
                    level=lvl,
                    x_lvl=x,
                    y_lvl=y,
                    width_lvl=min(size, width - x),
                    height_lvl=min(size, height - y),
                    halo_lvl=halo_lvl,
                )
            )
    return tiles


def foreground_tiles(
    image: ImageSource,
    *,
    level: int,
    tile_size: int,
    halo: int,
    mask: TissueMask | None = None,
    min_fraction: float = 0.0,
) -> list[Tile]:
    """The tiles of ``level`` whose core overlaps the foreground by more than ``min_fraction``.

    Parameters
    ----------
    image
        the image the tiles are for.
    level, tile_size, halo
        as for :func:`tile_grid`; the grid covers the whole level.
    mask
        a foreground mask of ``image`` (see
        :func:`simsearch_wsi.features.tissue.detect_foreground`); ``None`` keeps every tile.
    min_fraction
        keep a tile when the foreground covers strictly more than this fraction of its core's
        area, in [0, 1); the default 0 keeps every tile touching the foreground.

    Returns
    -------
    list[Tile]
        the kept tiles, row-major.
    """
    if not 0.0 <= float(min_fraction) < 1.0:
        raise ConfigError(f"min_fraction must be in [0, 1), got {min_fraction!r}")
    lv = _level_info(image, level)
    tiles = tile_grid(lv.width, lv.height, tile_size=tile_size, halo=halo, level=int(level))
    if mask is None:
        return tiles
    if tuple(mask.image_size_l0) != tuple(image.dimensions):
        raise ConfigError(
            f"{image.path}: the tissue mask was made for a {mask.image_size_l0[0]}x"
            f"{mask.image_size_l0[1]} image but this image is {image.dimensions[0]}x"
            f"{image.dimensions[1]}; compute the mask from this image"
        )
    x = np.array([t.x_lvl for t in tiles], dtype=np.float64) * lv.downsample_x
    y = np.array([t.y_lvl for t in tiles], dtype=np.float64) * lv.downsample_y
    w = np.array([t.width_lvl for t in tiles], dtype=np.float64) * lv.downsample_x
    h = np.array([t.height_lvl for t in tiles], dtype=np.float64) * lv.downsample_y
    fractions = mask.fractions_in_boxes(x, y, w, h)
    return [t for t, f in zip(tiles, fractions, strict=True) if f > min_fraction]


def read_tile(image: ImageSource, tile: Tile) -> NDArray[Any]:
    """Read a tile's region (core plus halo) as (H_read, W_read, C) of ``image.dtype``.

    Pixels outside the image are the image's fill value (white for brightfield, 0 otherwise).
    """
    _level_info(image, tile.level)
    return image.read_region(tile.read_location_l0(image), tile.level, tile.read_size_lvl)


def stitch(
    tiles: Sequence[Tile],
    arrays: Sequence[NDArray[Any]],
    *,
    level_width: int,
    level_height: int,
    fill: float = 0,
) -> NDArray[Any]:
    """Place each tile's core, cut from its read-sized result, into one level-sized array.

    Parameters
    ----------
    tiles
        tiles of one level (e.g. from :func:`tile_grid` or :func:`foreground_tiles`).
    arrays
        one per tile, (H_read, W_read, ...) with the tile's read size; trailing axes and dtype
        must agree.
    level_width, level_height
        size of the output's first two axes.
    fill
        value where no tile's core lands (tiles dropped by :func:`foreground_tiles`).

    Returns
    -------
    NDArray
        (level_height, level_width, ...) of the arrays' dtype.
    """
    if len(tiles) != len(arrays):
        raise ConfigError(f"stitch got {len(tiles)} tiles but {len(arrays)} arrays")
    width = _check_int(level_width, "level_width", minimum=1)
    height = _check_int(level_height, "level_height", minimum=1)
    if not tiles:
        raise ConfigError("stitch got no tiles; pass at least one tile and its array")
    first = np.asarray(arrays[0])
    out = np.full((height, width, *first.shape[2:]), fill, dtype=first.dtype)
    for tile, arr in zip(tiles, arrays, strict=True):
        a = np.asarray(arr)
        if a.shape[:2] != (tile.read_height_lvl, tile.read_width_lvl):
            raise ConfigError(
                f"stitch: the array for the tile at ({tile.x_lvl}, {tile.y_lvl}) has shape "
                f"{a.shape}, expected the read size ({tile.read_height_lvl}, "
                f"{tile.read_width_lvl}, ...)"
            )
        if (
            tile.x_lvl < 0
            or tile.y_lvl < 0
            or tile.x_lvl + tile.width_lvl > width
            or tile.y_lvl + tile.height_lvl > height
        ):
            raise ConfigError(
                f"stitch: the tile at ({tile.x_lvl}, {tile.y_lvl}) lies outside the "
                f"{width}x{height} output"
            )
        out[tile.core_slice_in_level()] = a[tile.core_slice_in_read()]
    return out


def read_overview(
    image: ImageSource,
    *,
    max_pixels: int,
    reduce: Literal["mean", "sample"] = "mean",
) -> tuple[NDArray[Any], float, float]:
    """A low-resolution view of the whole image of about ``max_pixels`` pixels or fewer.

    Rule: read whole the finest pyramid level that has at most ``max_pixels`` pixels. When
    every level is larger (a single-level or shallow pyramid), the coarsest level is streamed in
    bands of rows (never read at once) and reduced by an integer factor
    ``f = ceil(sqrt(pixels / max_pixels))`` per axis: ``reduce="mean"`` averages each f x f
    block (partial blocks at the right/bottom edge average the pixels they have), and
    ``reduce="sample"`` keeps every f-th pixel (rows and columns 0, f, 2f, ...; better for
    intensity statistics, which averaging narrows).

    Returns
    -------
    (array, downsample_x, downsample_y)
        the (h, w, C) overview (the image's dtype when read whole or sampled, float32 when
        block-averaged) and the level-0 pixels per overview pixel along each axis. The overview
        pixel (i, j) covers level-0 ``[j * downsample_x, (j + 1) * downsample_x)`` in x.
    """
    budget = _check_int(max_pixels, "max_pixels", minimum=1)
    if reduce not in ("mean", "sample"):
        raise ConfigError(f"reduce must be 'mean' or 'sample', got {reduce!r}")
    levels = image.levels
    fitting = [k for k, lv in enumerate(levels) if lv.width * lv.height <= budget]
    if fitting:
        k = max(fitting, key=lambda i: levels[i].width * levels[i].height)
        lv = levels[k]
        return image.read_level(k), float(lv.downsample_x), float(lv.downsample_y)
    k = min(range(len(levels)), key=lambda i: levels[i].width * levels[i].height)
    lv = levels[k]
    f = math.ceil(math.sqrt(lv.width * lv.height / budget))
    out_w, out_h = math.ceil(lv.width / f), math.ceil(lv.height / f)
    n_ch = image.n_channels
    out_dtype = image.dtype if reduce == "sample" else np.dtype(np.float32)
    out = np.empty((out_h, out_w, n_ch), dtype=out_dtype)
    band_rows = f * max(1, _BAND_PIXELS // (lv.width * f))
    x_l0 = lvl_to_l0_location(0, lv.downsample_x)
    for y in range(0, lv.height, band_rows):
        rows = min(band_rows, lv.height - y)
        y_l0 = lvl_to_l0_location(y, lv.downsample_y)
        band = image.read_region((x_l0, y_l0), k, (lv.width, rows))
        oy = y // f
        part = band[::f, ::f] if reduce == "sample" else _block_mean(band, f)
        out[oy : oy + part.shape[0]] = part
    return out, float(lv.downsample_x * f), float(lv.downsample_y * f)


def display_rgb8(overview: NDArray[Any], *, brightfield: bool) -> NDArray[np.uint8]:
    """(h, w, C) overview (:func:`read_overview`) -> (h, w, 3) uint8 for display.

    Brightfield RGB is shown as it is (clipped to 0..255). Anything else is a false-colour
    composite of its first 3 channels (channel 0 blue, 1 green, 2 red), each stretched between
    its 1st and 99.5th percentile; one channel is shown as grey.
    """
    a = np.asarray(overview, dtype=np.float32)
    finite = np.isfinite(a)
    if brightfield and a.shape[2] == 3:
        # NaN shows as white glass; +-inf as the ends of the range
        return np.clip(np.nan_to_num(a, nan=255.0), 0, 255).astype(np.uint8)
    out = np.zeros((*a.shape[:2], 3), np.float32)
    for c in range(min(3, a.shape[2])):
        values = a[..., c][finite[..., c]]
        lo, hi = np.percentile(values, [1.0, 99.5]) if values.size else (0.0, 1.0)
        channel = np.nan_to_num(a[..., c], nan=lo, posinf=hi, neginf=lo)
        out[..., (2 - c) if a.shape[2] > 1 else 0] = (channel - lo) / max(hi - lo, 1e-6)
    if a.shape[2] == 1:
        out[..., 1] = out[..., 2] = out[..., 0]
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def _block_mean(band_hwc: NDArray[Any], f: int) -> NDArray[np.float32]:
    """Mean of f x f blocks of an (H, W, C) band; partial edge blocks average what they have.

    Non-finite values (NaN, inf of float images) are left out of a block's mean; a block with
    no finite value is NaN.
    """
    h, w = band_hwc.shape[:2]
    data = band_hwc.astype(np.float64)
    # add.reduceat sums over [start_i, start_{i+1}) along an axis, the last run to the end.
    row_starts = np.arange(0, h, f)
    col_starts = np.arange(0, w, f)

    def block_sum(values: NDArray[np.float64]) -> NDArray[np.float64]:
        out: NDArray[np.float64] = np.add.reduceat(
            np.add.reduceat(values, row_starts, axis=0), col_starts, axis=1
        )
        return out

    if np.dtype(band_hwc.dtype).kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            sums = block_sum(np.where(finite, data, 0.0))
            n = block_sum(finite.astype(np.float64))
            with np.errstate(invalid="ignore", divide="ignore"):
                partial: NDArray[np.float32] = np.where(n > 0, sums / n, np.nan).astype(np.float32)
            return partial
    sums = block_sum(data)
    row_n = np.minimum(f, h - row_starts).astype(np.float64)
    col_n = np.minimum(f, w - col_starts).astype(np.float64)
    counts: NDArray[np.float64] = (row_n[:, None] * col_n[None, :])[:, :, None]
    mean: NDArray[np.float32] = (sums / counts).astype(np.float32)
    return mean
