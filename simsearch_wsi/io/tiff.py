"""TIFF-family slides through tiffslide: Aperio SVS, generic tiled pyramidal TIFF, OME-TIFF,
QPTIFF, NDPI, Leica SCN, Ventana and Philips TIFF, and plain (untiled) TIFF files.

Pixels are read from tiffslide's per-level zarr arrays in level coordinates, so a read decodes only
the tiles it touches and no level-0 <-> level rounding happens inside tiffslide.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.errors import ConfigError, CorruptImageError, UnsupportedFormatError
from simsearch_wsi.geometry import validate_mpp
from simsearch_wsi.io.base import (
    ImageMetadata,
    ImageSource,
    bit_depth_of,
    default_modality,
    levels_from_shapes,
)

_VENDOR_FORMATS = {
    "aperio": "aperio-svs",
    "hamamatsu": "hamamatsu-ndpi",
    "leica": "leica-scn",
    "ventana": "ventana-bif",
    "philips": "philips-tiff",
}


class TiffSource(ImageSource):
    """A TIFF-family image read with tiffslide (see module docstring for formats)."""

    def __init__(self, path: Path) -> None:
        import tiffslide

        try:
            slide = tiffslide.TiffSlide(path)
            props = dict(slide.properties)
            axes = str(props["tiffslide.series-axes"])
            group = slide.zarr_group
            arrays: list[Any] = [group[str(i)] for i in range(slide.level_count)]
        except tiffslide.TiffFileError as exc:
            raise CorruptImageError(
                f"{path}: not a readable TIFF ({exc}); the file may be truncated or not a TIFF"
            ) from exc
        except (KeyError, ValueError, IndexError, OSError) as exc:
            raise CorruptImageError(
                f"{path}: TIFF structure could not be read ({type(exc).__name__}: {exc}); "
                "the file may be truncated or corrupt"
            ) from exc
        self._slide = slide
        self._axes = axes
        self._plan = _AxisPlan.from_axes(axes, path)
        shapes = [self._plan.level_shape_hw(a.shape) for a in arrays]
        n_channels = self._plan.n_channels(arrays[0].shape)
        dtype = np.dtype(arrays[0].dtype)
        tf = slide.ts_tifffile
        fmt = _format_name(props, tf)
        mpp, mpp_source, mpp_note = _mpp_from_properties(props, path)
        names = _channel_names(tf, n_channels, dtype)
        modality = default_modality(n_channels, dtype, names)
        extra: dict[str, Any] = {"axes": axes}
        for key, name in (
            ("tiffslide.vendor", "vendor"),
            ("tiffslide.objective-power", "objective_power"),
        ):
            if props.get(key) is not None:
                extra[name] = props[key]
        if mpp_note:
            extra["mpp_note"] = mpp_note
        if self._plan.dropped:
            extra["dropped_axes"] = self._plan.dropped
        meta = ImageMetadata(
            format=fmt,
            levels=levels_from_shapes(shapes),
            dtype=dtype,
            channel_names=names,
            modality=modality,
            mpp=mpp,
            mpp_source=mpp_source,
            bit_depth=bit_depth_of(dtype),
            extra=extra,
        )
        super().__init__(path, meta)

    def _read_window(self, level: int, x0: int, y0: int, x1: int, y1: int) -> NDArray[Any]:
        try:
            # zarr_group is cached per thread inside tiffslide: safe to share across threads.
            arr: Any = self._slide.zarr_group[str(level)]
            raw = np.asarray(arr[self._plan.index(y0, y1, x0, x1)])
        except Exception as exc:  # decoder errors come in many types; name the read
            raise CorruptImageError(
                f"{self.path}: could not decode level {level} pixels x={x0}..{x1}, y={y0}..{y1} "
                f"({type(exc).__name__}: {exc}); the file may be truncated or corrupt"
            ) from exc
        return self._plan.to_hwc(raw)

    def close(self) -> None:
        self._slide.close()


class _AxisPlan:
    """How to slice a level array with tifffile axes (e.g. ``YXS``, ``CYX``, ``ZCYX``) to HWC."""

    def __init__(self, axes: str, channel_axis: str | None, dropped: str) -> None:
        self.axes = axes
        self.channel_axis = channel_axis
        self.dropped = dropped

    @classmethod
    def from_axes(cls, axes: str, path: Path) -> _AxisPlan:
        if "Y" not in axes or "X" not in axes:
            raise UnsupportedFormatError(f"{path}: TIFF series axes {axes!r} have no Y and X")
        channel_axes = [a for a in axes if a in "CS"]
        if len(channel_axes) > 1:
            raise UnsupportedFormatError(
                f"{path}: TIFF series axes {axes!r} have both samples and channels; "
                "convert the file to OME-TIFF or OME-Zarr with one channel axis"
            )
        dropped = "".join(a for a in axes if a not in "YXCS")
        return cls(axes, channel_axes[0] if channel_axes else None, dropped)

    def level_shape_hw(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (int(shape[self.axes.index("Y")]), int(shape[self.axes.index("X")]))

    def n_channels(self, shape: tuple[int, ...]) -> int:
        return 1 if self.channel_axis is None else int(shape[self.axes.index(self.channel_axis)])

    def index(self, y0: int, y1: int, x0: int, x1: int) -> tuple[Any, ...]:
        idx: list[Any] = []
        for a in self.axes:
            if a == "Y":
                idx.append(slice(y0, y1))
            elif a == "X":
                idx.append(slice(x0, x1))
            elif a in "CS":
                idx.append(slice(None))
            else:  # first plane of Z, T, ... (documented in README)
                idx.append(0)
        return tuple(idx)

    def to_hwc(self, raw: NDArray[Any]) -> NDArray[Any]:
        kept = [a for a in self.axes if a in "YXCS"]
        if self.channel_axis is None:
            out = raw[..., None] if kept == ["Y", "X"] else raw.T[..., None]
        else:
            out = np.moveaxis(raw, [kept.index("Y"), kept.index("X")], [0, 1])
        return np.ascontiguousarray(out)


def _format_name(props: dict[str, Any], tf: Any) -> str:
    vendor = props.get("tiffslide.vendor")
    if vendor in _VENDOR_FORMATS:
        return _VENDOR_FORMATS[str(vendor)]
    if getattr(tf, "is_qpi", False):
        return "qptiff"
    if getattr(tf, "is_ome", False):
        return "ome-tiff"
    n_levels = len(tf.series[0].levels) if tf.series else 1
    tiled = bool(tf.pages[0].is_tiled) if len(tf.pages) else False
    if n_levels > 1:
        return "tiff-pyramid"
    return "tiff-tiled" if tiled else "tiff"


def _mpp_from_properties(props: dict[str, Any], path: Path) -> tuple[float | None, str, str]:
    """(mpp, source, note). Display-default resolutions (72/96 dpi) are not a calibration."""
    mpp_x, mpp_y = props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y")
    if mpp_x is None:
        return None, "unknown", ""
    mean = (float(mpp_x) + float(mpp_y if mpp_y is not None else mpp_x)) / 2.0
    try:
        return validate_mpp(mean, source=str(path)), "metadata", ""
    except ConfigError:
        unit = props.get("tiff.ResolutionUnit", "?")
        return (
            None,
            "unknown",
            (
                f"ignored implausible pixel size {mean:.4g} um/px from TIFF resolution tags "
                f"(unit {unit}); pass --mpp to set it"
            ),
        )


def _channel_names(tf: Any, n_channels: int, dtype: np.dtype[Any]) -> tuple[str, ...]:
    names: list[str] = []
    try:
        if getattr(tf, "is_ome", False) and tf.ome_metadata:
            root = ET.fromstring(tf.ome_metadata)
            image = root.find("{*}Image")
            if image is not None:
                names = [ch.get("Name") or "" for ch in image.findall(".//{*}Channel")]
        elif getattr(tf, "is_qpi", False):
            for page in tf.series[0].pages[:n_channels]:
                # QPI descriptions declare utf-16 but arrive decoded: drop the declaration.
                text = re.sub(r"^\s*<\?xml[^>]*\?>", "", page.description)
                names.append((ET.fromstring(text).findtext("Name") or "").strip())
    except (ET.ParseError, AttributeError, UnicodeError):
        names = []
    if len(names) == n_channels and all(names):
        return tuple(names)
    if n_channels == 3 and dtype == np.uint8:
        return ("R", "G", "B")
    return tuple(f"C{i}" for i in range(n_channels))
