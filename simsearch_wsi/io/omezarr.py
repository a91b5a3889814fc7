"""OME-Zarr (OME-NGFF) multiscale images: versions 0.1-0.4 on Zarr v2 and 0.5 on Zarr v3.

Each NGFF version family is one small class with ``matches(attrs)`` and ``parse(attrs)``; the
reader picks the first that matches, so a new version is one new class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from zarr.storage import WrapperStore

from simsearch_wsi.core.errors import CorruptImageError, MetadataError, UnsupportedFormatError
from simsearch_wsi.core.geometry import validate_mpp
from simsearch_wsi.io.base import (
    ImageMetadata,
    ImageSource,
    bit_depth_of,
    default_modality,
    levels_from_shapes,
)

# Units allowed by NGFF for space axes, in micrometres.
_UNIT_TO_UM = {
    "angstrom": 1e-4,
    "nanometer": 1e-3,
    "micrometer": 1.0,
    "micron": 1.0,
    "millimeter": 1e3,
    "centimeter": 1e4,
    "meter": 1e6,
}


_Units = tuple[str | None, ...]


@dataclass(frozen=True)
class Multiscale:
    """The parts of NGFF ``multiscales[0]`` this project uses."""

    version: str
    axes: tuple[str, ...]
    units: tuple[str | None, ...]
    paths: tuple[str, ...]
    scales: tuple[tuple[float, ...] | None, ...]
    channel_labels: tuple[str, ...]


class _NgffFormat:
    """One NGFF version family: where its metadata lives and how axes are written.

    ``matches`` only looks at the version; ``parse`` validates the structure and raises
    :class:`MetadataError` naming the store and the part that is wrong.
    """

    versions: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def ngff_attrs(cls, attrs: dict[str, Any]) -> dict[str, Any]:
        return attrs

    @classmethod
    def version_of(cls, attrs: dict[str, Any]) -> str | None:
        """The declared version (``multiscales[0].version``, else the top-level ``version``)."""
        ngff = cls.ngff_attrs(attrs)
        ms = ngff.get("multiscales")
        first = ms[0] if isinstance(ms, list) and ms else None
        version = first.get("version") if isinstance(first, dict) else None
        if version is None:
            version = ngff.get("version")
        return None if version is None else str(version)

    @classmethod
    def matches(cls, attrs: dict[str, Any]) -> bool:
        return "multiscales" in cls.ngff_attrs(attrs) and cls.version_of(attrs) in cls.versions

    @classmethod
    def parse(cls, attrs: dict[str, Any], where: str) -> Multiscale:
        ngff = cls.ngff_attrs(attrs)
        ms = _first_multiscale(ngff, where)
        version = cls.version_of(attrs) or ""
        axes, units = cls.axes_of(ms, where)
        datasets = ms.get("datasets")
        if not isinstance(datasets, list) or not datasets:
            raise MetadataError(
                f"{where}: OME-Zarr multiscales 'datasets' must be a non-empty list, got "
                f"{_short(datasets)}"
            )
        paths = []
        for i, ds in enumerate(datasets):
            if not isinstance(ds, dict) or not isinstance(ds.get("path"), str) or not ds["path"]:
                raise MetadataError(
                    f"{where}: OME-Zarr multiscales dataset {i} has no 'path' (got "
                    f"{_short(ds)}); each dataset must be an object with the path of its array"
                )
            paths.append(ds["path"])
        global_scale = _scale_of(ms.get("coordinateTransformations"), len(axes), where)
        scales = []
        for ds in datasets:
            s = _scale_of(ds.get("coordinateTransformations"), len(axes), where)
            if s is not None and global_scale is not None:
                s = tuple(a * b for a, b in zip(s, global_scale, strict=True))
            scales.append(s)
        omero = ngff.get("omero")
        channels = omero.get("channels") if isinstance(omero, dict) else None
        labels = tuple(
            str(ch.get("label", ""))
            for ch in (channels if isinstance(channels, list) else [])
            if isinstance(ch, dict)
        )
        return Multiscale(
            version=version,
            axes=axes,
            units=units,
            paths=tuple(paths),
            scales=tuple(scales),
            channel_labels=labels,
        )

    @classmethod
    def axes_of(cls, ms: dict[str, Any], where: str) -> tuple[tuple[str, ...], _Units]:
        axes = ms.get("axes")
        if not isinstance(axes, list) or not axes:
            raise MetadataError(
                f"{where}: OME-Zarr multiscales 'axes' must be a list of axes, got {_short(axes)}"
            )
        names: list[str] = []
        units: list[str | None] = []
        for a in axes:
            name = a.get("name") if isinstance(a, dict) else a
            unit = a.get("unit") if isinstance(a, dict) else None
            if not isinstance(name, str) or not name:
                raise MetadataError(
                    f"{where}: OME-Zarr axis {_short(a)} has no name; axes are strings (0.3) or "
                    "objects with a 'name' (0.4+)"
                )
            names.append(name)
            units.append(unit if isinstance(unit, str) else None)
        if len(set(names)) != len(names):
            raise MetadataError(f"{where}: OME-Zarr axes {names} name an axis twice")
        return tuple(names), tuple(units)


class _Ngff01To02(_NgffFormat):
    """0.1 and 0.2 have no axes metadata: the spec fixes them to (t, c, z, y, x)."""

    versions = ("0.1", "0.2")

    @classmethod
    def axes_of(cls, ms: dict[str, Any], where: str) -> tuple[tuple[str, ...], _Units]:
        return ("t", "c", "z", "y", "x"), (None,) * 5


class _Ngff03To04(_NgffFormat):
    """0.3 names axes as strings; 0.4 as objects with type and unit. Zarr v2, ``.zattrs``."""

    versions = ("0.3", "0.4")


class _Ngff05(_NgffFormat):
    """0.5 and later on Zarr v3: metadata under the ``ome`` key of ``zarr.json`` attributes."""

    versions = ("0.5", "0.6")

    @classmethod
    def ngff_attrs(cls, attrs: dict[str, Any]) -> dict[str, Any]:
        ome = attrs.get("ome")
        return ome if isinstance(ome, dict) else {}


_FORMATS: tuple[type[_NgffFormat], ...] = (_Ngff05, _Ngff03To04, _Ngff01To02)


def _short(value: Any, limit: int = 60) -> str:
    """A value's repr cut to ``limit`` characters, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_multiscale(ngff: dict[str, Any], where: str) -> dict[str, Any]:
    ms = ngff.get("multiscales")
    if not isinstance(ms, list) or not ms or not isinstance(ms[0], dict):
        raise MetadataError(
            f"{where}: OME-Zarr 'multiscales' must be a list of objects, got {_short(ms)}; "
            "the image metadata is malformed"
        )
    first: dict[str, Any] = ms[0]
    return first


def _scale_of(transforms: Any, n_axes: int, where: str) -> tuple[float, ...] | None:
    if not isinstance(transforms, list):
        return None
    for t in transforms:
        if isinstance(t, dict) and t.get("type") == "scale" and isinstance(t.get("scale"), list):
            try:
                scale = tuple(float(v) for v in t["scale"])
            except (TypeError, ValueError) as exc:
                raise MetadataError(
                    f"{where}: OME-Zarr scale {_short(t['scale'])} is not a list of numbers"
                ) from exc
            return scale if len(scale) == n_axes else None
    return None


def ngff_attrs_kind(attrs: dict[str, Any]) -> str:
    """Classify group attributes: ``image``, ``plate``, ``well``, ``bioformats2raw``, ``other``."""
    ome = attrs.get("ome")
    ngff: dict[str, Any] = ome if isinstance(ome, dict) else attrs
    if "plate" in ngff:
        return "plate"
    if "well" in ngff:
        return "well"
    if "multiscales" in ngff:
        return "image"
    if "bioformats2raw.layout" in ngff:
        return "bioformats2raw"
    return "other"


def open_zarr_group(path: Path) -> Any:
    """Open a Zarr v2 or v3 group read-only, with a clear error when ``path`` is not one.

    Raises
    ------
    MetadataError
        a metadata file at the root (``.zgroup``, ``.zattrs``, ``zarr.json``) is not a JSON
        object, or the group's attributes cannot be read.
    UnsupportedFormatError
        the folder is not a Zarr group.
    """
    import zarr

    _check_metadata_json(path)
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for "not a group"
        raise UnsupportedFormatError(
            f"{path}: directory is not a Zarr group (no .zgroup/.zattrs or zarr.json); "
            "pass an OME-Zarr image or plate folder"
        ) from exc
    return group


def _check_metadata_json(path: Path) -> None:
    import json

    for name in (".zgroup", ".zattrs", "zarr.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            doc = json.loads(file.read_bytes())
        except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError
            raise MetadataError(
                f"{path}: {name} is not valid JSON ({exc}); the Zarr metadata is damaged"
            ) from exc
        if not isinstance(doc, dict):
            raise MetadataError(
                f"{path}: {name} must hold a JSON object, got {type(doc).__name__}; "
                "the Zarr metadata is damaged"
            )
        attrs = doc.get("attributes", {}) if name == "zarr.json" else {}
        if not isinstance(attrs, dict):
            raise MetadataError(
                f"{path}: zarr.json 'attributes' must be a JSON object, got {type(attrs).__name__}"
            )


def _first_field(attrs: dict[str, Any]) -> str:
    """``<row>/<column>/0`` of a plate's first well (``A/1/0`` when the metadata has none)."""
    ngff = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs
    wells = (ngff.get("plate") or {}).get("wells") if isinstance(ngff, dict) else None
    if isinstance(wells, list) and wells and isinstance(wells[0], dict):
        return f"{wells[0].get('path', 'A/1')}/0"
    return "A/1/0"


class OmeZarrSource(ImageSource):
    """An OME-Zarr multiscale image. The first time point and z plane are read."""

    def __init__(self, path: Path) -> None:
        group = open_zarr_group(path)
        attrs = dict(group.attrs)
        kind = ngff_attrs_kind(attrs)
        series_note = ""
        if kind == "plate":
            raise UnsupportedFormatError(
                f"{path}: is an OME-Zarr HCS plate, not one image; give one field by its path, "
                f"{path / _first_field(attrs)} (row/column/field; `simsearch-wsi info {path}` "
                "lists them), or the plate with --wells and --fields where a command takes it"
            )
        if kind == "well":
            raise UnsupportedFormatError(
                f"{path}: is an OME-Zarr plate well; open one of its fields, e.g. {path / '0'}"
            )
        if kind == "bioformats2raw":
            n_series = sum(1 for k in group.group_keys() if k.isdigit())
            if n_series == 0 or "0" not in group:
                raise MetadataError(f"{path}: bioformats2raw layout without image series '0'")
            series_note = f"bioformats2raw layout: opened series 0 of {n_series}"
            group = group["0"]
            attrs = dict(group.attrs)
        fmt_cls = next((f for f in _FORMATS if f.matches(attrs)), None)
        if fmt_cls is None:
            if kind == "other":
                row_of_plate = ""
                try:
                    if ngff_attrs_kind(dict(open_zarr_group(path.parent).attrs)) == "plate":
                        row_of_plate = f" (a row of a plate: give a field, {path}/<column>/<field>)"
                except Exception:  # the parent is no Zarr group: nothing more to say
                    pass
                raise UnsupportedFormatError(
                    f"{path}: Zarr group has no OME-Zarr 'multiscales' metadata; "
                    f"pass the folder of an OME-Zarr image{row_of_plate}"
                )
            _first_multiscale(_Ngff05.ngff_attrs(attrs) or attrs, str(path))
            version = _Ngff05.version_of(attrs) or _NgffFormat.version_of(attrs)
            raise MetadataError(
                f"{path}: OME-Zarr version {version!r} is not supported (supported: 0.1-0.5)"
            )
        ms = fmt_cls.parse(attrs, str(path))
        if "x" not in ms.axes or "y" not in ms.axes:
            raise MetadataError(f"{path}: OME-Zarr axes {ms.axes} have no 'y' and 'x'")
        self._arrays = [_dataset_array(group, p, ms.axes, str(path)) for p in ms.paths]
        self._axes = ms.axes
        iy, ix = ms.axes.index("y"), ms.axes.index("x")
        self._ic = ms.axes.index("c") if "c" in ms.axes else None
        shapes = [(int(a.shape[iy]), int(a.shape[ix])) for a in self._arrays]
        n_channels = 1 if self._ic is None else int(self._arrays[0].shape[self._ic])
        dtype = np.dtype(self._arrays[0].dtype)
        levels = levels_from_shapes(shapes, where=str(path))
        if n_channels == 0 or 0 in self._arrays[0].shape:
            raise CorruptImageError(
                f"{path}: OME-Zarr image has no pixels (dataset {ms.paths[0]!r} has shape "
                f"{tuple(self._arrays[0].shape)} for axes {''.join(ms.axes)}); export it again"
            )
        mpp = _mpp_of(ms, str(path))
        names = (
            ms.channel_labels
            if len(ms.channel_labels) == n_channels and all(ms.channel_labels)
            else (
                ("R", "G", "B")
                if n_channels == 3 and dtype == np.uint8
                else tuple(f"C{i}" for i in range(n_channels))
            )
        )
        extra: dict[str, Any] = {"ngff_version": ms.version, "axes": "".join(ms.axes)}
        if series_note:
            extra["series"] = series_note
        dropped = [a for a in ms.axes if a not in ("x", "y", "c")]
        if dropped:
            extra["dropped_axes"] = "".join(dropped)
        meta = ImageMetadata(
            format=f"ome-zarr-{ms.version}",
            levels=levels,
            dtype=dtype,
            channel_names=tuple(names),
            modality=default_modality(n_channels, dtype, channel_names=tuple(names)),
            mpp=mpp,
            mpp_source="metadata" if mpp is not None else "unknown",
            bit_depth=bit_depth_of(dtype),
            extra=extra,
        )
        super().__init__(path, meta)

    def _read_window(self, level: int, x0: int, y0: int, x1: int, y1: int) -> NDArray[Any]:
        idx: list[Any] = []
        for a in self._axes:
            if a == "y":
                idx.append(slice(y0, y1))
            elif a == "x":
                idx.append(slice(x0, x1))
            elif a == "c":
                idx.append(slice(None))
            else:  # first time point / z plane (documented)
                idx.append(0)
        try:
            raw = np.asarray(self._arrays[level][tuple(idx)])
        except CorruptImageError as exc:  # a chunk refused by _BloscFrameCheck
            raise CorruptImageError(
                f"{self.path}: could not read level {level} pixels x={x0}..{x1}, y={y0}..{y1}: "
                f"{exc}"
            ) from exc
        except Exception as exc:  # codec and store errors come in many types
            raise CorruptImageError(
                f"{self.path}: could not read level {level} pixels x={x0}..{x1}, y={y0}..{y1} "
                f"({type(exc).__name__}: {exc}); the image may be truncated or corrupt"
            ) from exc
        kept = [a for a in self._axes if a in ("y", "x", "c")]
        if self._ic is None:
            raw = raw[..., None]
            kept.append("c")
        order = [kept.index("y"), kept.index("x"), kept.index("c")]
        return np.ascontiguousarray(np.transpose(raw, order))


def _dataset_array(group: Any, key: str, axes: tuple[str, ...], where: str) -> Any:
    """The array a multiscales dataset points at, checked against the axes and for pixels."""
    import zarr

    try:
        node = group[key]
    except KeyError:
        node = None
    except Exception as exc:  # damaged array metadata: zarr raises many types
        raise MetadataError(
            f"{where}: OME-Zarr dataset {key!r} cannot be opened ({type(exc).__name__}: {exc}); "
            "its array metadata is damaged"
        ) from exc
    if not isinstance(node, zarr.Array):
        raise MetadataError(
            f"{where}: OME-Zarr multiscales dataset {key!r} is "
            f"{'missing' if node is None else 'a group, not an array'}; the metadata names an "
            "array the store does not have"
        )
    if node.ndim != len(axes):
        raise MetadataError(
            f"{where}: OME-Zarr axes {''.join(axes)!r} name {len(axes)} dimensions but dataset "
            f"{key!r} has {node.ndim} (shape {tuple(node.shape)}); fix the multiscales axes"
        )
    dtype = np.dtype(node.dtype)
    if dtype.kind not in "buif":
        raise MetadataError(
            f"{where}: OME-Zarr dataset {key!r} holds {dtype} values, not pixel intensities "
            "(integer or float)"
        )
    chunks = getattr(node, "chunks", None)
    if chunks is not None and any(int(c) <= 0 for c in chunks):
        raise MetadataError(
            f"{where}: OME-Zarr dataset {key!r} has chunk shape {tuple(chunks)}; every chunk "
            "side must be positive: its array metadata is damaged"
        )
    return _with_blosc_frame_check(node)


def _stores_blosc_frames(node: Any) -> bool:
    """Whether every stored chunk of ``node`` is one whole Blosc frame (a v2 Blosc compressor,
    or a v3 codec chain ending in Blosc without sharding)."""
    meta = getattr(node, "metadata", None)
    compressor = getattr(meta, "compressor", None)
    if compressor is not None:
        return getattr(compressor, "codec_id", None) == "blosc"
    codecs = list(getattr(meta, "codecs", None) or ())
    return bool(codecs) and type(codecs[-1]).__name__ == "BloscCodec"


def _with_blosc_frame_check(node: Any) -> Any:
    """``node`` reopened through :class:`_BloscFrameCheck` when its chunks are Blosc frames."""
    if not _stores_blosc_frames(node):
        return node
    import zarr

    try:
        return zarr.open_array(store=_BloscFrameCheck(node.store), path=node.path, mode="r")
    except Exception:  # an unusual store: read it as it is
        return node


def _is_chunk_key(key: str) -> bool:
    name = key.rpartition("/")[2]
    return bool(name) and not name.startswith(".") and name != "zarr.json"


class _BloscFrameCheck(WrapperStore[Any]):
    """A read-only store that refuses a chunk whose Blosc header disagrees with its length.

    A Blosc frame records its compressed size in header bytes 12-16. numcodecs decodes a frame
    cut short without complaint, into garbage (it trusts the header), so a truncated chunk file
    (an interrupted copy) read as silent noise. Whole-chunk reads only (byte ranges are shard
    parts; :func:`_stores_blosc_frames` excludes sharded arrays).
    """

    def _with_store(self, store: Any) -> _BloscFrameCheck:
        return _BloscFrameCheck(store)

    async def get(self, key: str, prototype: Any, byte_range: Any | None = None) -> Any | None:
        value = await self._store.get(key, prototype, byte_range)
        if value is None or byte_range is not None or not _is_chunk_key(key):
            return value
        raw = value.as_numpy_array()
        size = int(raw[12:16].view("<u4")[0]) if raw.size >= 16 else None
        if size != raw.size:
            raise CorruptImageError(
                f"chunk {key!r} holds {raw.size} bytes but its Blosc header "
                + (f"says {size}" if size is not None else "is incomplete")
                + "; the chunk file is truncated or corrupt"
            )
        return value


def _mpp_of(ms: Multiscale, where: str) -> float | None:
    scale0 = ms.scales[0]
    if scale0 is None:
        return None
    values = []
    for axis in ("y", "x"):
        i = ms.axes.index(axis)
        unit = ms.units[i]
        if unit is None or unit not in _UNIT_TO_UM:
            return None
        values.append(scale0[i] * _UNIT_TO_UM[unit])
    mean = sum(values) / 2.0
    try:
        return validate_mpp(mean, source=where)
    except Exception:
        return None
