"""The uniform image interface every backend implements.

An :class:`ImageSource` is a read-only, multi-resolution, multi-channel 2-D image. Backends only
implement :meth:`ImageSource._read_window`, an in-bounds read of one level in level pixels; the
base class owns argument checking, the level-0 -> level conversion and deterministic padding, so
every backend behaves the same at the borders.

Thread safety: a source may be shared between threads for reads (the TIFF backend keeps one
decoder handle per thread; the OME-Zarr and in-memory backends are read-only). Across processes
(Dask workers), sources pickle by path and reopen on the other side.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError, CorruptImageError, RegionError
from simsearch_wsi.core.geometry import validate_mpp

Modality = Literal["brightfield", "fluorescence"]

# A single read above this many pixels is refused: stream the image through tiles instead.
MAX_REGION_PIXELS = 1 << 30


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level: its size in level pixels and its downsample per axis vs level 0."""

    width: int
    height: int
    downsample_x: float
    downsample_y: float

    @property
    def downsample(self) -> float:
        """Mean of the per-axis downsamples (OpenSlide's convention)."""
        return (self.downsample_x + self.downsample_y) / 2.0


@dataclass(frozen=True)
class ImageMetadata:
    """What a backend knows about an image, independent of how it is stored."""

    format: str
    levels: tuple[LevelInfo, ...]
    dtype: np.dtype[Any]
    channel_names: tuple[str, ...]
    modality: Modality
    mpp: float | None
    mpp_source: str
    bit_depth: int
    extra: dict[str, Any] = field(default_factory=dict)


def levels_from_shapes(
    shapes_hw: list[tuple[int, int]], *, where: str = "image"
) -> tuple[LevelInfo, ...]:
    """Build :class:`LevelInfo` records from per-level (height, width), level 0 first.

    Raises
    ------
    CorruptImageError
        no level, or a level with a width or height of 0 (``where`` names the image).
    """
    empty = [i for i, (h, w) in enumerate(shapes_hw) if h <= 0 or w <= 0]
    if not shapes_hw or empty:
        detail = (
            f"level {empty[0]} is {shapes_hw[empty[0]][1]}x{shapes_hw[empty[0]][0]} px"
            if empty
            else "it has no level"
        )
        raise CorruptImageError(
            f"{where}: image has no pixels ({detail}); the file is empty or was written "
            "incompletely: export it again"
        )
    h0, w0 = shapes_hw[0]
    return tuple(
        LevelInfo(width=w, height=h, downsample_x=w0 / w, downsample_y=h0 / h) for h, w in shapes_hw
    )


RGB_CHANNEL_NAMES = ("R", "G", "B")


def default_modality(
    n_channels: int, dtype: np.dtype[Any], *, channel_names: tuple[str, ...] = RGB_CHANNEL_NAMES
) -> Modality:
    """Guess: three uint8 channels named like RGB are a brightfield scan; the rest fluorescence.

    Channel names from the file (e.g. ``DAPI, FITC, Cy5`` in a QPTIFF) mark fluorescence even
    when the pixels happen to be 3 x uint8. Callers can override with ``modality=``.
    """
    rgb_like = tuple(n.strip().lower()[:1] for n in channel_names) == ("r", "g", "b")
    return "brightfield" if n_channels == 3 and dtype == np.uint8 and rgb_like else "fluorescence"


def bit_depth_of(dtype: np.dtype[Any]) -> int:
    return int(np.dtype(dtype).itemsize * 8)


def path_identity(path: str | os.PathLike[str]) -> str:
    """A string that changes when the pixels of the image at ``path`` may have changed (cache
    keys), read without opening the image. Files: resolved path, size and modification time;
    folders (OME-Zarr): resolved path and the modification times of the metadata files at
    its root."""
    p = Path(path).resolve()
    if p.is_dir():
        stamps = [
            f"{m.name}:{m.stat().st_mtime_ns}"
            for m in sorted(p.iterdir())
            if m.name in (".zattrs", ".zgroup", "zarr.json", ".zmetadata")
        ]
        return f"{p}|{'|'.join(stamps)}"
    st = p.stat()
    return f"{p}|{st.st_size}|{st.st_mtime_ns}"


class ImageSource(ABC):
    """A read-only multi-resolution image.

    Coordinates: ``read_region`` takes its location in level-0 pixels (like OpenSlide and
    QuPath) and its size in pixels of the requested level. Arrays are always (H, W, C).
    """

    def __init__(
        self,
        path: Path,
        metadata: ImageMetadata,
        *,
        open_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._path = path
        self._meta = metadata
        self._open_kwargs = dict(open_kwargs or {})

    # --- metadata -------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._path

    @property
    def format(self) -> str:
        """Short name of the container format, e.g. ``aperio-svs``, ``ome-zarr-0.4``, ``png``."""
        return self._meta.format

    @property
    def levels(self) -> tuple[LevelInfo, ...]:
        return self._meta.levels

    @property
    def level_count(self) -> int:
        return len(self._meta.levels)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return (self._meta.levels[0].width, self._meta.levels[0].height)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((lv.width, lv.height) for lv in self._meta.levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(lv.downsample for lv in self._meta.levels)

    @property
    def mpp(self) -> float | None:
        """Level-0 pixel size in micrometres per pixel, or None when unknown."""
        return self._meta.mpp

    @property
    def mpp_source(self) -> str:
        """Where :attr:`mpp` came from: ``metadata``, ``user``, or ``unknown``."""
        return self._meta.mpp_source

    @property
    def channel_names(self) -> tuple[str, ...]:
        return self._meta.channel_names

    @property
    def n_channels(self) -> int:
        return len(self._meta.channel_names)

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._meta.dtype

    @property
    def bit_depth(self) -> int:
        """Bits per sample of the stored dtype (8, 16, 32)."""
        return self._meta.bit_depth

    @property
    def modality(self) -> Modality:
        return self._meta.modality

    @property
    def is_brightfield(self) -> bool:
        return self._meta.modality == "brightfield"

    @property
    def fill_value(self) -> int | float:
        """Value used outside the image: white glass for brightfield, zero for fluorescence."""
        if self.is_brightfield:
            return int(np.iinfo(self.dtype).max) if self.dtype.kind in "ui" else 1.0
        return 0

    @property
    def extra(self) -> dict[str, Any]:
        """Backend-specific facts (vendor, objective power, OME-Zarr version, ...)."""
        return dict(self._meta.extra)

    def identity(self) -> str:
        """A string that changes when the image's pixels may have changed (cache keys):
        :func:`path_identity` of its path."""
        return path_identity(self.path)

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable summary of everything this source knows."""
        return {
            "path": str(self.path),
            "format": self.format,
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "levels": [
                {
                    "width": lv.width,
                    "height": lv.height,
                    "downsample": round(lv.downsample, 6),
                }
                for lv in self.levels
            ],
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "channels": list(self.channel_names),
            "n_channels": self.n_channels,
            "dtype": str(self.dtype),
            "bit_depth": self.bit_depth,
            "modality": self.modality,
            **({"extra": self.extra} if self.extra else {}),
        }

    def _apply_overrides(self, *, mpp: float | None, modality: Modality | None) -> None:
        """Apply the user's pixel size and modality; called once by ``open_image``."""
        if mpp is not None:
            value = validate_mpp(mpp, source=str(self.path))
            self._meta = replace(self._meta, mpp=value, mpp_source="user")
            self._open_kwargs["mpp"] = value
        if modality is not None:
            if modality not in ("brightfield", "fluorescence"):
                raise ConfigError(
                    f"{self.path}: modality {modality!r} must be 'brightfield' or 'fluorescence'"
                )
            self._meta = replace(self._meta, modality=modality)
            self._open_kwargs["modality"] = modality

    # --- reading -------------------------------------------------------------------------
    def get_best_level_for_downsample(self, downsample: float) -> int:
        """Index of the coarsest level whose downsample is <= ``downsample`` (at least level 0)."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= downsample * (1 + 1e-6):
                best = i
        return best

    def read_region(
        self,
        location_l0: tuple[int, int],
        level: int,
        size: tuple[int, int],
        *,
        fill: int | float | None = None,
    ) -> NDArray[Any]:
        """Read a region as an (H, W, C) array of :attr:`dtype`.

        Parameters
        ----------
        location_l0
            (x, y) of the region's top-left corner in **level-0** pixels.
        level
            pyramid level to read from; ``0`` is full resolution.
        size
            (width, height) of the output in pixels **of ``level``**.
        fill
            value for pixels outside the image; default :attr:`fill_value`.

        The level-0 location is mapped to level pixels by ``round(x_l0 / downsample_x)``. Pixels
        of the region that fall outside the image are set to ``fill``; a region that does not
        overlap the image at all raises :class:`RegionError`. Only the output array and the
        in-bounds part are allocated.
        """
        if not 0 <= int(level) < self.level_count or int(level) != level:
            raise RegionError(
                f"{self.path}: level {level} does not exist; the image has levels "
                f"0..{self.level_count - 1}"
            )
        width, height = (int(size[0]), int(size[1]))
        if width <= 0 or height <= 0 or width != size[0] or height != size[1]:
            raise RegionError(
                f"{self.path}: region size {tuple(size)} must be two positive integers (w, h)"
            )
        if width * height > MAX_REGION_PIXELS:
            raise RegionError(
                f"{self.path}: region {width}x{height} is too large for one read "
                f"(>{MAX_REGION_PIXELS} px); read it in tiles (simsearch_wsi.features.tiling)"
            )
        lv = self.levels[level]
        x0 = math.floor(location_l0[0] / lv.downsample_x + 0.5)
        y0 = math.floor(location_l0[1] / lv.downsample_y + 0.5)
        x1, y1 = x0 + width, y0 + height
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x1, lv.width), min(y1, lv.height)
        if cx0 >= cx1 or cy0 >= cy1:
            raise RegionError(
                f"{self.path}: region at level-0 ({location_l0[0]}, {location_l0[1]}) size "
                f"{width}x{height} on level {level} lies outside the image "
                f"({lv.width}x{lv.height} at level {level}, {self.dimensions[0]}x"
                f"{self.dimensions[1]} at level 0)"
            )
        inside = self._read_window(level, cx0, cy0, cx1, cy1)
        if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
            return inside
        out = np.full(
            (height, width, self.n_channels),
            self.fill_value if fill is None else fill,
            dtype=self.dtype,
        )
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = inside
        return out

    def read_level(self, level: int) -> NDArray[Any]:
        """Read a whole level as (H, W, C). Use only for small levels; for an overview of any
        image use :func:`simsearch_wsi.features.tiling.read_overview`, which streams large
        levels."""
        if not 0 <= level < self.level_count:
            raise RegionError(
                f"{self.path}: level {level} does not exist; the image has levels "
                f"0..{self.level_count - 1}"
            )
        lv = self.levels[level]
        return self._read_window(level, 0, 0, lv.width, lv.height)

    @abstractmethod
    def _read_window(self, level: int, x0: int, y0: int, x1: int, y1: int) -> NDArray[Any]:
        """Read level pixels [y0:y1, x0:x1] (in bounds, non-empty) as (H, W, C)."""

    # --- lifetime ------------------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 - optional hook, default no-op
        """Release file handles. Reading after close is undefined."""

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        from simsearch_wsi.io.open import open_image

        return (_reopen, (open_image, str(self._path), self._open_kwargs))

    def __repr__(self) -> str:
        w, h = self.dimensions
        mpp = f"{self.mpp:.4g}" if self.mpp is not None else "unknown"
        return (
            f"<{type(self).__name__} {self.path.name!r} {self.format} {w}x{h} "
            f"levels={self.level_count} channels={self.n_channels} mpp={mpp}>"
        )


def _reopen(opener: Any, path: str, kwargs: dict[str, Any]) -> ImageSource:
    source: ImageSource = opener(path, **kwargs)
    return source
