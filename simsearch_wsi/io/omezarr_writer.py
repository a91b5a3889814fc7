"""Write (C, Y, X) images as multiscale OME-Zarr: NGFF 0.4 on Zarr v2 or 0.5 on Zarr v3.

:func:`write_ome_zarr_image` writes a new image folder; :func:`write_multiscale_group` fills a
group that already exists (e.g. a field of an HCS plate). Levels are 2x2 area averages at paths
``"0"``, ``"1"``, ...; axes c, y, x with the pixel size in micrometres; ``omero`` channel labels
and colours. What differs between the versions is :mod:`simsearch_wsi.io.ngff`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.checks import check_positive_int
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import validate_mpp
from simsearch_wsi.io.ngff import NgffVersion, ngff_format
from simsearch_wsi.io.pyramid import area_pyramid, check_n_levels

__all__ = ["write_multiscale_group", "write_ome_zarr_image"]

# the multiscales "metadata" of every image written here
_MULTISCALE_METADATA = {
    "method": "2x2 area average",
    "description": "simsearch_wsi.io.omezarr_writer",
}
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


def _channel_color(name: str, index: int) -> str:
    return _DEFAULT_CHANNEL_COLORS.get(
        name.upper(), _FALLBACK_CHANNEL_COLORS[index % len(_FALLBACK_CHANNEL_COLORS)]
    )


def _omero(channel_names: Sequence[str], dtype: np.dtype[Any]) -> dict[str, Any]:
    """Channel labels and colours, display window the dtype's range (0..1 for floats)."""
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


def write_multiscale_group(
    group: Any,
    levels: Sequence[NDArray[Any]],
    *,
    version: NgffVersion,
    mpp: float | None,
    channel_names: Sequence[str],
    chunk: int,
    name: str,
) -> None:
    """Write CYX ``levels`` as arrays "0", "1", ... of the Zarr ``group`` plus the image metadata.

    ``group`` must be of ``version``'s Zarr format (v2 for 0.4, v3 for 0.5). Level ``k`` gets
    scale ``mpp * 2**k`` on y and x; chunks are (C, ``chunk``, ``chunk``). ``mpp=None`` writes
    a pixel size unknown to readers: spatial axes without a unit and scale ``2**k``.
    """
    unit = {} if mpp is None else {"unit": "micrometer"}
    pixel = 1.0 if mpp is None else mpp
    fmt = ngff_format(version)
    for k, lvl in enumerate(levels):
        fmt.write_array(
            group,
            str(k),
            data=lvl,
            chunks=(lvl.shape[0], chunk, chunk),
            dimension_names=("c", "y", "x"),
        )
    multiscale = fmt.multiscale(
        name=name,
        axes=[
            {"name": "c", "type": "channel"},
            {"name": "y", "type": "space", **unit},
            {"name": "x", "type": "space", **unit},
        ],
        transforms=[
            [{"type": "scale", "scale": [1.0, pixel * 2**k, pixel * 2**k]}]
            for k in range(len(levels))
        ],
        type_="mean",
        metadata=_MULTISCALE_METADATA,
    )
    fmt.write_attrs(
        group,
        {"multiscales": [multiscale], "omero": fmt.omero(_omero(channel_names, levels[0].dtype))},
    )


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
    fmt = ngff_format(version)
    arr = np.asarray(array_cyx)
    if arr.ndim != 3 or 0 in arr.shape:
        raise ConfigError(f"array_cyx must be a non-empty (C, Y, X) array, got {arr.shape}")
    names = (channel_names,) if isinstance(channel_names, str) else tuple(channel_names)
    if len(names) != arr.shape[0]:
        raise ConfigError(f"{len(names)} channel names for {arr.shape[0]} channels")
    mpp = validate_mpp(mpp, source=str(path))
    n_levels = check_n_levels(n_levels, width=arr.shape[2], height=arr.shape[1])
    chunk = check_positive_int("chunk", chunk)
    out = Path(path)
    write_multiscale_group(
        fmt.create_group(out),
        area_pyramid(arr, n_levels, y_axis=1),
        version=fmt.version,
        mpp=mpp,
        channel_names=names,
        chunk=chunk,
        name=out.name,
    )
    return out
