"""Plain raster images (PNG, JPEG, BMP, ...) read with Pillow as a one-level slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simsearch_wsi.core.errors import CorruptImageError, UnsupportedFormatError
from simsearch_wsi.io.memory import ArraySource


def open_plain_image(path: Path) -> ArraySource:
    """Decode a PNG/JPEG/BMP file fully (these formats have no tiles) into an ArraySource.

    RGBA loses its alpha channel, palette images become RGB, 16-bit greyscale stays uint16.
    The pixel size is unknown (a raster dpi is a print setting, not a calibration): pass ``mpp``.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            fmt = (im.format or path.suffix.lstrip(".")).lower()
            decoded: Image.Image = im
            if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBA", "LA"):
                decoded = im.convert("RGB" if im.mode not in ("LA", "PA") else "L")
            arr = np.asarray(decoded)
    except Image.DecompressionBombError as exc:
        raise UnsupportedFormatError(
            f"{path}: image too large to decode in one piece; convert it to a tiled pyramidal "
            "TIFF or OME-Zarr first"
        ) from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedFormatError(f"{path}: not an image Pillow can decode") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(
            f"{path}: could not decode image ({exc}); the file may be truncated or corrupt"
        ) from exc
    if arr.dtype == np.int32:  # Pillow's 'I' mode for 16-bit PNGs
        arr = arr.astype(np.uint16) if arr.max(initial=0) < 65536 else arr
    return ArraySource(arr, path=path, n_levels=1, mpp=None, format=fmt)
