"""TIFF-family slides through tiffslide: Aperio SVS, generic tiled pyramidal TIFF, OME-TIFF,
QPTIFF, NDPI, Leica SCN, Ventana and Philips TIFF, and plain (untiled) TIFF files.

Pixels are read in level coordinates, so a read decodes only the tiles it touches and no
level-0 <-> level rounding happens inside tiffslide: a level stored as one tiled page tile by tile
with tifffile's decoder (:meth:`TiffSource._read_tiles`), any other level through tiffslide's
per-level zarr arrays. Each reading thread keeps the tiles it decoded (bounded:
:data:`DECODED_TILE_CACHE_BYTES`), so overlapping reads (tiles with halos) decode a tile once.
"""

from __future__ import annotations

import logging
import re
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from zarr.storage import WrapperStore

from simsearch_wsi.core.errors import ConfigError, CorruptImageError, UnsupportedFormatError
from simsearch_wsi.core.geometry import validate_mpp
from simsearch_wsi.io.base import (
    ImageMetadata,
    ImageSource,
    bit_depth_of,
    default_modality,
    levels_from_shapes,
)

# tifffile logs every damaged tag of a broken header as a warning. Without a handler those
# records reached stderr through logging's last-resort handler, around the one-line error the
# reader raises; an application that configures logging still receives them.
logging.getLogger("tifffile").addHandler(logging.NullHandler())

_VENDOR_FORMATS = {
    "aperio": "aperio-svs",
    "hamamatsu": "hamamatsu-ndpi",
    "leica": "leica-scn",
    "ventana": "ventana-bif",
    "philips": "philips-tiff",
}


class TiffSource(ImageSource):
    """A TIFF-family image read with tiffslide (see module docstring for formats).

    Files tiffslide does not lay out (series with Z, T or other extra axes, e.g. an OME-TIFF
    with ``SizeZ > 1``) are read through tifffile's own zarr view of series 0, and the first
    plane of every extra axis is used, as for OME-Zarr.
    """

    def __init__(self, path: Path) -> None:
        import tiffslide

        self._store_lock = threading.Lock()
        self._local = threading.local()
        self._slide: Any = None
        self._tf: Any = None
        with _StructureLog() as log:
            try:
                slide = tiffslide.TiffSlide(path)
            except MemoryError:
                raise
            except Exception as exc:  # tifffile raises many types for a damaged header
                raise _corrupt(path, exc) from exc
            try:
                try:
                    props = dict(slide.properties)
                    self._slide = slide
                    self._n_levels = int(slide.level_count)
                except NotImplementedError:
                    # tiffslide lays out only YX, YXS and CYX series: read series 0 with
                    # tifffile.
                    props = _series_properties(slide.ts_tifffile, path)
                    self._tf = slide.ts_tifffile
                    self._n_levels = len(self._tf.series[0].levels)
                axes = str(props["tiffslide.series-axes"])
                _check_not_truncated(slide.ts_tifffile, path)
                log.check(path)
                arrays = self._level_arrays()
            except (CorruptImageError, UnsupportedFormatError, MemoryError):
                slide.close()
                raise
            except Exception as exc:  # KeyError, ValueError, struct.error, decoder errors, ...
                slide.close()
                raise _corrupt(path, exc) from exc
        self._closer = slide
        self._axes = axes
        try:
            meta = self._metadata(path, props, arrays)
        except BaseException:
            slide.close()
            raise
        self._tiled_pages = _tiled_pages(slide, props, arrays) if self._slide is not None else []
        super().__init__(path, meta)

    def _metadata(self, path: Path, props: dict[str, Any], arrays: list[Any]) -> ImageMetadata:
        """Check the level arrays and describe the image (sets the axis plan)."""
        axes = self._axes
        shape0 = tuple(int(v) for v in arrays[0].shape)
        if len(shape0) != len(axes):
            raise CorruptImageError(
                f"{path}: TIFF series shape {shape0} does not match its axes {axes!r}; the file "
                "may be corrupt"
            )
        if 0 in shape0:
            raise CorruptImageError(
                f"{path}: TIFF image has no pixels (series shape {shape0}, axes {axes!r}); "
                "the file is empty or was written incompletely: export it again"
            )
        self._plan = _AxisPlan.from_axes(axes, path)
        shapes = [self._plan.level_shape_hw(a.shape) for a in arrays]
        n_channels = self._plan.n_channels(arrays[0].shape)
        dtype = np.dtype(arrays[0].dtype)
        if dtype.kind not in "buif":
            raise UnsupportedFormatError(
                f"{path}: TIFF pixel type {dtype} is not supported (integer or float samples "
                "are); convert the image to 8- or 16-bit"
            )
        tf = self._closer.ts_tifffile
        fmt = _format_name(props, tf)
        mpp, mpp_source, mpp_note = _mpp_from_properties(props, path)
        names = _channel_names(tf, n_channels, dtype)
        modality = default_modality(n_channels, dtype, channel_names=names)
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
        return ImageMetadata(
            format=fmt,
            levels=levels_from_shapes(shapes, where=str(path)),
            dtype=dtype,
            channel_names=names,
            modality=modality,
            mpp=mpp,
            mpp_source=mpp_source,
            bit_depth=bit_depth_of(dtype),
            extra=extra,
        )

    def _level_arrays(self) -> list[Any]:
        """This thread's zarr arrays of the levels, read through a :class:`_GuardedStore`.

        tiffslide keeps one zarr group per thread; the TIFF fallback does the same with
        tifffile's store. Each thread's store has its own guard (see :meth:`_read_window`).
        """
        arrays: list[Any] | None = getattr(self._local, "arrays", None)
        if arrays is not None:
            return arrays
        import zarr

        with self._store_lock:
            if self._slide is not None:
                base = self._slide.zarr_group.store
            else:
                base = self._tf.series[0].aszarr()
        guard = _ReadGuard()
        tiles = _TileCache(DECODED_TILE_CACHE_BYTES)
        opened: Any = zarr.open(
            _GuardedStore(base, guard=guard, tiles=tiles), mode="r", zarr_format=2
        )
        if isinstance(opened, zarr.Array):
            arrays = [opened]
        else:
            arrays = [opened[str(i)] for i in range(self._n_levels)]
        self._local.arrays = arrays
        self._local.guard = guard
        self._local.tiles = tiles
        return arrays

    def _read_window(self, level: int, x0: int, y0: int, x1: int, y1: int) -> NDArray[Any]:
        where = f"level {level} pixels x={x0}..{x1}, y={y0}..{y1}"
        page = self._tiled_pages[level] if level < len(self._tiled_pages) else None
        if page is not None:
            return self._read_tiles(level, page, x0, y0, x1, y1, where)
        try:
            arr = self._level_arrays()[level]
            guard: _ReadGuard = self._local.guard
            guard.failure = None
            raw = np.asarray(arr[self._plan.index(y0, y1, x0, x1)])
        except Exception as exc:  # decoder errors come in many types; name the read
            raise CorruptImageError(
                f"{self.path}: could not decode {where} ({type(exc).__name__}: {exc}); "
                "the file may be truncated or corrupt"
            ) from exc
        if guard.failure is not None:
            key, exc = guard.failure
            guard.failure = None
            tile = self._tile_text(level, key)
            if isinstance(exc, _MissingTileError):
                raise self._missing_tile_error(where, tile)
            raise self._tile_error(where, tile, exc) from exc
        return self._plan.to_hwc(raw)

    def _missing_tile_error(self, where: str, tile: str) -> CorruptImageError:
        return CorruptImageError(
            f"{self.path}: could not read {where}: {tile} has no data (a sparse TIFF: "
            "its offset or byte count is 0; OpenSlide shows it transparent); export the "
            "image again with every tile written, or analyse a region without it"
        )

    def _tile_error(self, where: str, tile: str, exc: BaseException) -> CorruptImageError:
        return CorruptImageError(
            f"{self.path}: could not decode {where}: {tile} failed "
            f"({type(exc).__name__}: {exc}); the file may be truncated or corrupt"
        )

    def _read_tiles(
        self, level: int, page: Any, x0: int, y0: int, x1: int, y1: int, where: str
    ) -> NDArray[Any]:
        """The window from the tiles of a level stored as one tiled page (:func:`_tiled_pages`),
        read and decoded as tifffile's zarr store does (the same bytes, the same decoder) but
        without zarr's per-tile overhead, each tile kept in this thread's cache of decoded
        tiles. (H, W, S) in the page's dtype."""
        self._level_arrays()  # this thread's tile cache
        cache: _TileCache = self._local.tiles
        th, tw, n = int(page.tilelength), int(page.tilewidth), int(page.samplesperpixel)
        tiles_x = -(-int(page.imagewidth) // tw)
        out = np.empty((y1 - y0, x1 - x0, n), page.dtype)
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                key = (level, ty, tx)
                tile = cache.get(key)
                if tile is None:
                    tile = self._decode_tile(level, page, ty, tx, ty * tiles_x + tx, where)
                    cache.put(key, tile, tile.nbytes)
                ty0, tx0 = ty * th, tx * tw
                sy0, sy1 = max(y0, ty0), min(y1, ty0 + th)
                sx0, sx1 = max(x0, tx0), min(x1, tx0 + tw)
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[
                    sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0
                ]
        return out

    def _decode_tile(
        self, level: int, page: Any, ty: int, tx: int, index: int, where: str
    ) -> NDArray[Any]:
        """Tile ``index`` (row ``ty``, column ``tx``) of ``page`` as (th, tw, S), read-only;
        :class:`CorruptImageError` naming the tile when it has no data or does not decode."""
        key = f"{level}/{ty}.{tx}" + (".0" if self._plan.channel_axis is not None else "")
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if offset <= 0 or count <= 0:
            raise self._missing_tile_error(where, self._tile_text(level, key))
        th, tw, n = int(page.tilelength), int(page.tilewidth), int(page.samplesperpixel)
        try:
            fh = page.parent.filehandle
            with fh.lock:  # the lock tifffile's own reads take
                fh.seek(offset)
                data = fh.read(count)
            decoded = page.decode(
                data,
                index,
                jpegtables=page.jpegtables,
                jpegheader=getattr(page, "jpegheader", None),
                _fullsize=True,
            )[0]
            if decoded is None or decoded.size != th * tw * n:
                raise ValueError(f"decoded {getattr(decoded, 'shape', None)}, not {th}x{tw}x{n}")
            tile = np.asarray(decoded).reshape(th, tw, n)
        except Exception as exc:  # decoder errors come in many types
            raise self._tile_error(where, self._tile_text(level, key), exc) from exc
        tile.setflags(write=False)  # shared by later reads through the cache
        return tile

    def _tile_text(self, level: int, key: str) -> str:
        """``tile (row r, column c) of level L at x=..., y=...`` for a zarr chunk key such as
        ``0/1.2.0`` (level 0, chunk indices in the axis order of the level array)."""
        head, _, name = key.rpartition("/")
        level_of_key = int(head) if head.isdigit() else level
        try:
            index = [int(v) for v in name.split(".")]
            chunks = self._level_arrays()[level_of_key].chunks
            iy, ix = self._plan.axes.index("Y"), self._plan.axes.index("X")
            row, col = index[iy], index[ix]
            th, tw = int(chunks[iy]), int(chunks[ix])
        except (ValueError, IndexError, AttributeError):
            return f"tile {key!r} of level {level_of_key}"
        return (
            f"tile (row {row}, column {col}) of level {level_of_key} at "
            f"x={col * tw}..{(col + 1) * tw}, y={row * th}..{(row + 1) * th}"
        )

    def close(self) -> None:
        self._closer.close()


class _StructureLog(logging.Handler):
    """The damage tifffile reports while a file is opened, by this thread.

    tifffile does not raise for a broken IFD chain or SubIFDs pointing past the end of the file
    (a truncated pyramid): it logs the problem and drops the pages, so the file opened as a
    smaller image with fewer levels. Used as a context manager around the open; :meth:`check`
    turns what was logged into a :class:`CorruptImageError`.
    """

    # tifffile's words for a broken IFD chain or SubIFDs, not for odd metadata: an ImageJ or
    # shaped series whose description disagrees with the pages ("... metadata invalid or
    # corrupted file") or a bad GeoTIFF key falls back to a generic series and reads fine
    _WORDS = (
        "corrupted tag list",
        "corrupted IFD structure",
        "invalid page offset",
        "invalid offset to page",
        "invalid SubIFDs",
    )

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self._thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self._thread:
            return
        message = record.getMessage()
        if any(word in message for word in self._WORDS):
            self.messages.append(message)

    def __enter__(self) -> _StructureLog:
        logging.getLogger("tifffile").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("tifffile").removeHandler(self)

    def check(self, path: Path) -> None:
        if self.messages:
            detail = self.messages[0].split("> ", 1)[-1]  # without tifffile's object repr
            raise CorruptImageError(
                f"{path}: TIFF structure is damaged ({detail[:160]}); the file may be truncated "
                "or corrupt: copy or export it again"
            )


def _corrupt(path: Path, exc: BaseException) -> CorruptImageError:
    return CorruptImageError(
        f"{path}: TIFF structure could not be read ({type(exc).__name__}: {exc}); "
        "the file may be truncated or corrupt"
    )


class _MissingTileError(Exception):
    """A tile the file lists without data (offset or byte count 0): zarr would fill it."""


def _is_chunk_key(key: str) -> bool:
    name = key.rpartition("/")[2]
    return bool(name) and not name.startswith(".") and name != "zarr.json"


class _ReadGuard:
    """The first tile failure of the current read of one thread's store."""

    def __init__(self) -> None:
        self.failure: tuple[str, Exception] | None = None


#: Decoded tiles kept per reading thread of a :class:`TiffSource` (bytes). Reads with a halo
#: (``embed``: 1024-px tiles with 112-px halos) touch each 256-px JPEG tile about 2.25 times;
#: the tiles of the previous read are reused by the next one on its right, and by the row of
#: reads below while a row of reads fits (about 13000 px wide for 256-px RGB tiles), so each
#: tile is decoded about once (issue 24: 0.05 instead of 0.10 CPU s per 9 tiles of 1248 px).
DECODED_TILE_CACHE_BYTES = 64 * 2**20


class _TileCache:
    """A least-recently-used map of zarr chunk keys to decoded tiles, bounded in bytes.

    Only successfully decoded tiles enter it: a damaged or missing tile is decoded (and
    refused) at every read. One per thread's store, so no lock.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    def get(self, key: Hashable) -> Any | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        """Keep ``value`` (``nbytes`` bytes, never written to by its readers) under ``key``."""
        if nbytes > self.max_bytes or key in self._items:
            return
        self._items[key] = (value, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            _, (_, size) = self._items.popitem(last=False)
            self.nbytes -= size


class _GuardedStore(WrapperStore[Any]):
    """A read-only zarr store whose chunk reads never raise.

    zarr reads the chunks of one region concurrently (``asyncio.gather``) and, when one fails,
    leaves the others running; their exceptions were then logged as "Task exception was never
    retrieved", dozens of tracebacks after the error. Here the first failure is recorded on the
    guard and returned as a missing chunk, every later chunk of the read is skipped (returned
    missing without decoding), and the reader raises one error once the read has returned. A
    tile the file lists without data (offset or byte count 0) is a failure too: zarr would
    return it as a block of fill value, a silent black tile.

    With ``tiles``, decoded tiles are kept in that :class:`_TileCache` and served from it by
    later reads (the halos of neighbouring reads overlap).
    """

    def __init__(
        self, store: Any, *, guard: _ReadGuard | None = None, tiles: _TileCache | None = None
    ) -> None:
        super().__init__(store)
        self._guard = guard if guard is not None else _ReadGuard()
        self._tiles = tiles

    def _with_store(self, store: Any) -> _GuardedStore:
        return _GuardedStore(store, guard=self._guard, tiles=self._tiles)

    async def get(self, key: str, prototype: Any, byte_range: Any | None = None) -> Any | None:
        if self._guard.failure is not None:
            return None  # a sibling tile failed: the read is lost, skip the work
        cacheable = self._tiles is not None and byte_range is None and _is_chunk_key(key)
        if cacheable:
            cached = self._tiles.get(key)  # type: ignore[union-attr]
            if cached is not None:
                return cached
        try:
            value = await self._store.get(key, prototype, byte_range)
        except Exception as exc:  # decoder errors come in many types
            if self._guard.failure is None:
                self._guard.failure = (key, exc)
            return None
        if value is None and _is_chunk_key(key) and self._guard.failure is None:
            # tifffile returns no chunk for a tile without data; zarr would read it as a
            # silent block of fill value (black)
            self._guard.failure = (key, _MissingTileError(key))
        elif value is not None and cacheable:
            array = getattr(value, "as_numpy_array", None)
            if array is not None:  # shared by later reads: never written to
                array().setflags(write=False)
            self._tiles.put(key, value, len(value))  # type: ignore[union-attr]
        return value

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]


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


def _check_not_truncated(tf: Any, path: Path) -> None:
    """Refuse a file whose tiles or strips lie past its end (an interrupted copy or download) or
    that lists fewer tiles or strips than its size needs. Tiles listed without data (a sparse
    TIFF, valid) are refused only when a read touches one (:class:`_GuardedStore`).

    Checks every page of every level of every series when there are at most
    :data:`_PAGES_CHECKED_IN_FULL` pages, else the first and last page of each level (a
    truncated file loses its last-written bytes).
    """
    size = int(tf.filehandle.size)
    for series in tf.series:
        n_pages = sum(len(level.pages) for level in series.levels)
        for i, level in enumerate(series.levels):
            pages = list(level.pages)
            if n_pages > _PAGES_CHECKED_IN_FULL:
                pages = pages[:1] + pages[-1:]
            for page in {id(p): p for p in pages if p is not None}.values():
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if offsets.shape != counts.shape or offsets.size == 0 or 0 in page.shape:
                    continue  # no pixels: refused with its own message by the reader
                key = getattr(page, "keyframe", None) or page
                chunked = getattr(key, "chunked", None)
                needed = int(np.prod(chunked)) if chunked else 0
                if offsets.size < needed:
                    raise CorruptImageError(
                        f"{path}: file is corrupt: level {i} is {key.imagewidth}x"
                        f"{key.imagelength} px, which needs {needed} tiles or strips, but the "
                        f"file lists {offsets.size}; export the file again"
                    )
                empty = (offsets <= 0) | (counts <= 0)
                ends = offsets + counts
                if (ends[~empty] > size).any():
                    first = int(np.flatnonzero(~empty & (ends > size))[0])
                    raise CorruptImageError(
                        f"{path}: file is truncated or corrupt: the pixels of level {i} end at "
                        f"byte {int(ends[~empty].max())} but the file has {size} bytes (tile or "
                        f"strip {first} of {offsets.size} lies past the end); copy or export "
                        "the file again"
                    )
                # Tiles listed without data (offset or byte count 0) are not refused here: a
                # sparse TIFF is valid (libtiff writes them, OpenSlide shows such tiles as
                # transparent), so the file opens and a read that touches one is refused with
                # the tile named (_GuardedStore), never filled with black.


_PAGES_CHECKED_IN_FULL = 256


def _whole_tiled_page(page: Any, arr: Any, tf: Any) -> bool:
    """Whether the tiled ``page`` of ``tf`` holds the level array ``arr`` whole, one tile per
    chunk, samples interleaved."""
    th, tw = int(page.tilelength), int(page.tilewidth)
    keyframe = getattr(page, "keyframe", None)
    return bool(
        id(keyframe) == id(page)  # a TiffPage, not a TiffFrame
        and page.parent is tf  # not a page of another file (multi-file OME-TIFF)
        and page.is_tiled
        and int(page.tiledepth) == 1
        and int(page.imagedepth) == 1
        and (int(page.planarconfig) == 1 or int(page.samplesperpixel) == 1)
        and tuple(page.shape) == tuple(arr.shape)
        and np.dtype(page.dtype) == np.dtype(arr.dtype)
        and tuple(arr.chunks[:2]) == (th, tw)
        and len(page.dataoffsets) == len(page.databytecounts)
        and len(page.dataoffsets)
        == -(-int(page.imagelength) // th) * -(-int(page.imagewidth) // tw)
    )


def _tiled_pages(slide: Any, props: dict[str, Any], arrays: list[Any]) -> list[Any]:
    """Per level, the tiled TIFF page that holds it whole, or None where the level is read
    through zarr (several pages, strips, separate sample planes, a composed series, other
    axes, a transform). :meth:`TiffSource._read_tiles` reads those pages' tiles directly.
    Any doubt (an unexpected attribute) gives None: the zarr path reads every level."""
    try:
        if props.get("tiffslide.series-composition") or str(
            props.get("tiffslide.series-axes")
        ) not in ("YXS", "YX"):
            return []
        tf = slide.ts_tifffile
        tf.filehandle.set_lock(True)  # as tifffile's zarr store does: reads from many threads
        series = tf.series[int(props.get("tiffslide.series-index", 0))]
        if getattr(series, "transform", None) is not None or len(series.levels) != len(arrays):
            return []
        pages: list[Any] = []
        for level, arr in zip(series.levels, arrays, strict=True):
            page = level.pages[0] if len(level.pages) == 1 else None
            pages.append(page if page is not None and _whole_tiled_page(page, arr, tf) else None)
        return pages
    except Exception:  # an odd file: every level through zarr
        return []


def _series_properties(tf: Any, path: Path) -> dict[str, Any]:
    """tiffslide-like properties of series 0 for the files tiffslide does not lay out.

    The pixel size comes from the OME-XML ``Pixels`` element (``PhysicalSizeX/Y`` with their
    units, micrometres by default) or else from the TIFF resolution tags.
    """
    if not tf.series:
        raise CorruptImageError(f"{path}: TIFF has no image series; the file may be corrupt")
    series = tf.series[0]
    props: dict[str, Any] = {"tiffslide.series-axes": str(series.axes), "tiffslide.vendor": None}
    mpp = _ome_mpp(tf) or _resolution_mpp(series)
    if mpp is not None:
        props["tiffslide.mpp-x"], props["tiffslide.mpp-y"] = mpp
    return props


_OME_UNIT_UM = {
    "nm": 1e-3,
    "\u00b5m": 1.0,
    "\u03bcm": 1.0,
    "um": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}


def _ome_mpp(tf: Any) -> tuple[float, float] | None:
    if not getattr(tf, "is_ome", False) or not tf.ome_metadata:
        return None
    try:
        pixels = ET.fromstring(tf.ome_metadata).find("{*}Image/{*}Pixels")
    except ET.ParseError:
        return None
    if pixels is None:
        return None
    sizes = []
    for axis in ("X", "Y"):
        value = pixels.get(f"PhysicalSize{axis}")
        scale = _OME_UNIT_UM.get(pixels.get(f"PhysicalSize{axis}Unit", "\u00b5m"))
        try:
            size = float(value) * scale if value is not None and scale is not None else None
        except ValueError:
            size = None
        if size is None or not size > 0:
            return None
        sizes.append(size)
    return sizes[0], sizes[1]


def _resolution_mpp(series: Any) -> tuple[float, float] | None:
    import tifffile

    page = series.pages[0] if len(series.pages) else None
    tags = getattr(page, "tags", None)
    if tags is None or not all(k in tags for k in ("ResolutionUnit", "XResolution", "YResolution")):
        return None
    scale = {tifffile.RESUNIT.INCH: 25400.0, tifffile.RESUNIT.CENTIMETER: 10000.0}.get(
        tags["ResolutionUnit"].value
    )
    try:
        num_x, den_x = tags["XResolution"].value
        num_y, den_y = tags["YResolution"].value
        return (scale * den_x / num_x, scale * den_y / num_y) if scale else None
    except (TypeError, ValueError, ZeroDivisionError):
        return None


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
