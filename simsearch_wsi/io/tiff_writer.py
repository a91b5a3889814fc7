"""Write an RGB image as a tiled pyramidal TIFF that tiffslide (and QuPath) open as a slide.

Used for synthetic slides and for real images that come as plain arrays (e.g. scikit-image's
IHC sample in the demo and the feature study).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.checks import check_positive_int
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.io.pyramid import area_pyramid, check_n_levels

__all__ = ["Compression", "check_compression", "check_tile_size", "write_pyramidal_tiff"]

Compression = Literal["jpeg", "zlib"] | None


def check_tile_size(tile_size: int) -> int:
    """``tile_size`` as an ``int`` when it is a multiple of 16 and at least 16 (TIFF rule)."""
    tile = check_positive_int("tile_size", tile_size, minimum=16)
    if tile % 16:
        raise ConfigError(f"tile_size must be a multiple of 16 (TIFF rule), got {tile}")
    return tile


def check_compression(compression: Compression) -> Compression:
    """``compression`` when it is ``"jpeg"``, ``"zlib"`` or ``None``."""
    if compression not in ("jpeg", "zlib", None):
        raise ConfigError(f"compression must be 'jpeg', 'zlib' or None, got {compression!r}")
    return compression


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

    tile = check_tile_size(tile_size)
    check_compression(compression)
    rgb = np.asarray(rgb_hwc)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ConfigError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    n_levels = check_n_levels(n_levels, width=rgb.shape[1], height=rgb.shape[0])
    out = Path(path)
    levels = area_pyramid(rgb, n_levels, y_axis=0)
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
