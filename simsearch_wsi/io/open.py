"""``open_image``: pick the backend for a path by looking at its bytes, not its name."""

from __future__ import annotations

import os
from pathlib import Path

from simsearch_wsi.core.errors import CorruptImageError, ImageNotFoundError, UnsupportedFormatError
from simsearch_wsi.io.base import ImageSource, Modality

SUPPORTED_FORMATS = (
    "Aperio SVS, Hamamatsu NDPI, Leica SCN, Ventana BIF, Philips TIFF, generic tiled pyramidal "
    "TIFF, OME-TIFF, QPTIFF (via tiffslide); OME-Zarr images and HCS plates (NGFF 0.1-0.5); "
    "PNG, JPEG, BMP and plain TIFF"
)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_RASTER_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF8")


def _is_zarr_dir(path: Path) -> bool:
    return (
        (path / ".zgroup").exists() or (path / ".zattrs").exists() or (path / "zarr.json").exists()
    )


def open_image(
    path: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    modality: Modality | None = None,
) -> ImageSource:
    """Open any supported image for region reads.

    Parameters
    ----------
    path
        a slide or image file, or an OME-Zarr image folder.
    mpp
        level-0 pixel size in micrometres per pixel; overrides the file's value (use it when
        the file has none, e.g. the TCGA JPEG2000 SVS or a PNG).
    modality
        ``"brightfield"`` or ``"fluorescence"``; overrides the guess (3 x uint8 = brightfield).

    Raises
    ------
    ImageNotFoundError
        the path does not exist.
    UnsupportedFormatError
        the path is not a format listed in :data:`SUPPORTED_FORMATS` (or is a plate: use
        :func:`simsearch_wsi.io.open_plate`).
    CorruptImageError
        the file is truncated or cannot be decoded.
    """
    p = Path(path)
    if not p.exists():
        raise ImageNotFoundError(f"{p}: no such file or directory; check the path")
    source: ImageSource
    if p.is_dir():
        if not _is_zarr_dir(p):
            raise UnsupportedFormatError(
                f"{p}: directory is not an OME-Zarr image (no .zattrs/.zgroup or zarr.json); "
                "pass a slide file or an OME-Zarr folder"
            )
        from simsearch_wsi.io.omezarr import OmeZarrSource

        source = OmeZarrSource(p)
    else:
        with p.open("rb") as fh:
            head = fh.read(132)
        if len(head) < 8:
            raise CorruptImageError(f"{p}: file is empty or truncated ({len(head)} bytes)")
        if head[:4] in _TIFF_MAGIC:
            from simsearch_wsi.io.tiff import TiffSource

            source = TiffSource(p)
        elif any(head.startswith(m) for m in _RASTER_MAGIC):
            from simsearch_wsi.io.plain import open_plain_image

            source = open_plain_image(p)
        elif head[128:132] == b"DICM":
            raise UnsupportedFormatError(
                f"{p}: DICOM images are not supported; convert the slide to OME-TIFF or "
                "OME-Zarr (e.g. with bioformats2raw) and open that"
            )
        else:
            raise UnsupportedFormatError(
                f"{p}: unrecognised file format; supported: {SUPPORTED_FORMATS}"
            )
    source._apply_overrides(mpp=mpp, modality=modality)
    return source
