"""An in-memory image source: plain PNG/JPEG files, and arrays made by tests or callers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.io.base import (
    ImageMetadata,
    ImageSource,
    Modality,
    bit_depth_of,
    default_modality,
    levels_from_shapes,
)


def _pyramid(array_hwc: NDArray[Any], n_levels: int) -> list[NDArray[Any]]:
    """Level 0 plus ``n_levels - 1`` levels, each a 2x2 mean of the previous (floor size)."""
    levels = [array_hwc]
    for _ in range(n_levels - 1):
        prev = levels[-1]
        h, w = prev.shape[0] // 2, prev.shape[1] // 2
        if h == 0 or w == 0:
            break
        blocks = prev[: 2 * h, : 2 * w].reshape(h, 2, w, 2, prev.shape[2]).astype(np.float64)
        mean = blocks.mean(axis=(1, 3))
        if np.issubdtype(prev.dtype, np.integer):
            mean = np.rint(mean)
        levels.append(mean.astype(prev.dtype))
    return levels


class ArraySource(ImageSource):
    """An image held in memory as (H, W, C) arrays, one per level.

    Parameters
    ----------
    array_hwc
        level-0 pixels, (H, W) or (H, W, C).
    path
        a name for messages and ``describe()``; nothing is read from it.
    n_levels
        number of pyramid levels to build by 2x2 mean pooling (``1`` = no pyramid).
    mpp, channel_names, modality
        metadata; defaults derive from the array (3 x uint8 = brightfield RGB).
    """

    def __init__(
        self,
        array_hwc: NDArray[Any],
        *,
        path: str | Path = "<memory>",
        n_levels: int = 1,
        mpp: float | None = None,
        channel_names: tuple[str, ...] | None = None,
        modality: Modality | None = None,
        format: str = "array",
    ) -> None:
        arr = np.asarray(array_hwc)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ConfigError(f"{path}: expected an (H, W) or (H, W, C) array, got {arr.shape}")
        if n_levels < 1:
            raise ConfigError(f"{path}: n_levels must be >= 1, got {n_levels}")
        self._arrays = _pyramid(np.ascontiguousarray(arr), n_levels)
        self._identity: str | None = None
        n_ch = arr.shape[2]
        if channel_names is None:
            channel_names = ("R", "G", "B") if n_ch == 3 else tuple(f"C{i}" for i in range(n_ch))
        if len(channel_names) != n_ch:
            raise ConfigError(f"{path}: {len(channel_names)} channel names for {n_ch} channels")
        meta = ImageMetadata(
            format=format,
            levels=levels_from_shapes([(a.shape[0], a.shape[1]) for a in self._arrays]),
            dtype=arr.dtype,
            channel_names=tuple(channel_names),
            modality=modality or default_modality(n_ch, arr.dtype),
            mpp=mpp,
            mpp_source="metadata" if mpp is not None else "unknown",
            bit_depth=bit_depth_of(arr.dtype),
        )
        super().__init__(Path(path), meta)

    def _read_window(self, level: int, x0: int, y0: int, x1: int, y1: int) -> NDArray[Any]:
        return self._arrays[level][y0:y1, x0:x1].copy()

    def identity(self) -> str:
        """Content hash of the level-0 pixels (an in-memory image has no file to stat)."""
        import hashlib

        if self._identity is None:  # hashing is linear in the image: do it once
            a = self._arrays[0]
            digest = hashlib.sha256(a.tobytes()).hexdigest()[:32]
            self._identity = f"array|{a.shape}|{a.dtype}|{digest}"
        return self._identity

    def __reduce__(self) -> tuple[Any, ...]:
        # In-memory sources travel with their pixels; file-backed ones reopen by path.
        return (
            _rebuild_array_source,
            (
                self._arrays[0],
                str(self.path),
                self.level_count,
                self.mpp,
                self.channel_names,
                self.modality,
                self.format,
            ),
        )


def _rebuild_array_source(
    arr: NDArray[Any],
    path: str,
    n_levels: int,
    mpp: float | None,
    channel_names: tuple[str, ...],
    modality: Modality,
    fmt: str,
) -> ArraySource:
    return ArraySource(
        arr,
        path=path,
        n_levels=n_levels,
        mpp=mpp,
        channel_names=channel_names,
        modality=modality,
        format=fmt,
    )
