"""Per-image feature caches on disk: embed once, query many times.

A cache entry is a Zarr store ``<root>/<image stem>.<key16>.zarr`` holding

* ``features``: (H_f, W_f, D) float16 on the analysis grid, chunked one tile per chunk; only
  foreground tiles are ever written (absent chunks read as 0);
* ``computed``: (n_tiles_y, n_tiles_x) uint8, 1 where a tile was embedded;
* attributes: the :class:`~simsearch_wsi.features.extractor.FeatureSpec`, the image identity
  and the key.

The key hashes the image identity (path, size, mtime) with the backbone, weights, analysis scale,
normalisation, channels and tiling, so changing any of them gives a new entry. Work in progress
lives in ``<entry>.partial`` and is renamed when complete, so an interrupted ``embed`` resumes
where it stopped and a finished entry is never half-written. One process should fill an entry at
a time.
"""

from __future__ import annotations

import re
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError, CorruptImageError, MetadataError
from simsearch_wsi.features.extractor import (
    FEATURE_FORMAT_VERSION,
    FeatureExtractor,
    FeatureSpec,
    GridTile,
    ProgressFn,
    analysis_tiles,
    iter_tile_features,
)
from simsearch_wsi.features.tissue import detect_foreground, no_foreground_error
from simsearch_wsi.io.base import ImageSource


@dataclass
class FeatureMap:
    """A complete cached feature map. ``array`` is the Zarr (H_f, W_f, D) float16 array."""

    path: Path
    spec: FeatureSpec
    stride: int
    array: Any
    computed: NDArray[np.bool_]
    channel_mean: NDArray[np.float32]
    channel_std: NDArray[np.float32]

    @property
    def shape(self) -> tuple[int, int, int]:
        h, w, d = self.array.shape
        return (int(h), int(w), int(d))

    @property
    def tile_cells(self) -> int:
        return self.spec.tile_size // self.stride

    def read(self) -> NDArray[np.float16]:
        """The whole map as (H_f, W_f, D) float16. For large slides prefer :meth:`read_cells`."""
        return np.asarray(self.array[:])

    def read_cells(self, y0: int, y1: int, x0: int, x1: int) -> NDArray[np.float16]:
        """Cells ``[y0:y1, x0:x1]`` as (h, w, D) float16 (clipped to the map)."""
        return np.asarray(self.array[max(y0, 0) : y1, max(x0, 0) : x1])

    def computed_cells(self) -> NDArray[np.bool_]:
        """(H_f, W_f) bool: cells inside an embedded (foreground) tile."""
        t = self.tile_cells
        full = np.repeat(np.repeat(self.computed, t, axis=0), t, axis=1)
        return full[: self.shape[0], : self.shape[1]]


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60] or "image"


class FeatureCache:
    """A folder of feature maps (see module docstring). Safe to share between processes that
    read; entries are written by one process at a time."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry_path(self, image: ImageSource, spec: FeatureSpec) -> Path:
        key = spec.key(image.identity())
        return self.root / f"{_safe_stem(image.path.name)}.{key[:16]}.zarr"

    def contains(self, image: ImageSource, spec: FeatureSpec) -> bool:
        return self.entry_path(image, spec).is_dir()

    def open(self, image: ImageSource, spec: FeatureSpec) -> FeatureMap:
        """Open a complete entry; :class:`MetadataError` when absent or not matching."""
        import zarr

        path = self.entry_path(image, spec)
        if not path.is_dir():
            raise MetadataError(f"{path}: no cached features for {image.path.name}; run embed")
        group: Any = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        if attrs.get("version") != FEATURE_FORMAT_VERSION or attrs.get("key") != spec.key(
            image.identity()
        ):
            raise MetadataError(
                f"{path}: feature cache of another format version or key; delete it to recompute"
            )
        return FeatureMap(
            path,
            spec,
            int(attrs["stride"]),
            group["features"],
            np.asarray(group["computed"][:]).astype(bool),
            np.asarray(group["channel_mean"][:], dtype=np.float32),
            np.asarray(group["channel_std"][:], dtype=np.float32),
        )

    def get_or_compute(
        self,
        image: ImageSource,
        extractor: FeatureExtractor,
        *,
        spec: FeatureSpec,
        batch_size: int = 4,
        progress: ProgressFn | None = None,
    ) -> FeatureMap:
        """The cached map, computing (or finishing) it first when needed.

        With ``spec.tiles == "foreground"`` only tiles touching the foreground mask are
        embedded. Raises :class:`ConfigError` when there is nothing to embed (no foreground).
        """
        import zarr

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
        final = self.entry_path(image, spec)
        if final.is_dir():
            return self.open(image, spec)
        key = spec.key(image.identity())
        partial = final.with_name(final.name + ".partial")
        mask = detect_foreground(image) if spec.tiles == "foreground" else None
        tiles, ny, nx = analysis_tiles(image, spec, mask=mask)
        if not tiles:
            raise no_foreground_error(image)
        s = extractor.stride
        tc = spec.tile_size // s
        width_a, height_a = spec.scale.analysis_size(image)
        d = extractor.out_dim(len(spec.channels), spec.rgb)
        shape = (-(-height_a // s), -(-width_a // s), d)
        group = _open_partial(partial, key)
        if group is None:
            from zarr.codecs import ZstdCodec

            self.root.mkdir(parents=True, exist_ok=True)
            group = zarr.open_group(str(partial), mode="w")
            group.create_array(
                "features",
                shape=shape,
                chunks=(tc, tc, d),
                dtype="float16",
                fill_value=0,
                # zstd level 1: the size of the default level on these features, faster to
                # write (benchmarks/bench_embed_stages.py, docs/benchmarks.md)
                compressors=ZstdCodec(level=1),
            )
            group.create_array(
                "computed", shape=(ny, nx), chunks=(ny, nx), dtype="uint8", fill_value=0
            )
            group.attrs.update(
                {
                    "version": FEATURE_FORMAT_VERSION,
                    "key": key,
                    "stride": s,
                    "image": image.identity(),
                    "spec": spec.to_dict(),
                    "shape": list(shape),
                }
            )
        # zarr's own test for a chunk of fill value compares float16 in software (a third of
        # a tile's write time): _write_block tests the bits instead and skips those chunks
        feats_arr = group["features"].with_config({"write_empty_chunks": True})
        computed_arr = group["computed"]
        computed = np.asarray(computed_arr[:]).astype(bool)
        earlier = computed.copy()  # tiles of an interrupted run
        todo = [t for t in tiles if not computed[t.index_y, t.index_x]]
        stats = _ChannelSums(d)

        def store(tile: GridTile, f: torch.Tensor) -> None:
            y0, x0 = tile.index_y * tc, tile.index_x * tc
            # float16 already (float32=False); a numpy copy to HWC, no torch op in this thread
            block = np.ascontiguousarray(f.permute(1, 2, 0).numpy(), dtype=np.float16)
            _write_block(feats_arr, y0, x0, block)
            stats.add(block)  # the float16 values written, without reading them back
            computed[tile.index_y, tile.index_x] = True
            computed_arr[tile.index_y, tile.index_x] = 1  # progress survives an interruption

        # One writer thread stores the tiles in order while the trunk runs on the next batch
        # (zstd and numpy release the GIL); at most a batch and a tile wait for it. When the
        # run stops (an error, an interrupt), leaving the pool waits for the queued writes, so
        # every embedded tile is kept for a resume.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-write") as writer:
            pending: deque[Future[None]] = deque()
            for tile, f in iter_tile_features(
                image,
                extractor,
                spec=spec,
                tiles=todo,
                batch_size=batch_size,
                progress=progress,
                float32=False,
            ):
                pending.append(writer.submit(store, tile, f))
                while len(pending) > batch_size or (pending and pending[0].done()):
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
        missing = [t for t in tiles if not computed[t.index_y, t.index_x]]
        if missing:  # never finalise an incomplete entry
            raise CorruptImageError(f"{image.path}: {len(missing)} tiles were not embedded")
        if earlier.any():
            # a resumed entry: every tile read back in row-major order, as a fresh entry sums
            # them while embedding, so both give the same bytes (float64 sums depend on order)
            mean, std = _channel_stats(feats_arr, computed, tc)
        else:
            mean, std = stats.mean_std()
        group.create_array("channel_mean", data=mean, overwrite=True)
        group.create_array("channel_std", data=std, overwrite=True)
        partial.rename(final)
        return self.open(image, spec)


def _write_block(feats_arr: Any, y0: int, x0: int, block: NDArray[np.float16]) -> None:
    """Write an (h, w, D) float16 block at cell (y0, x0) of ``feats_arr``, a Zarr array opened
    with ``write_empty_chunks=True``. A block whose bits are all 0 (+0.0, the fill value) is
    not written, as zarr's default would not write it (it compares the bits, so -0.0 is
    written), so the store holds the same chunks and bytes."""
    if not block.view(np.uint16).any():
        return
    feats_arr[y0 : y0 + block.shape[0], x0 : x0 + block.shape[1]] = block


def _open_partial(partial: Path, key: str) -> Any:
    """An unfinished entry to resume, or None (absent, another key, or unreadable: removed)."""
    import zarr

    if not partial.is_dir():
        return None
    try:
        group = zarr.open_group(str(partial), mode="r+")
        if group.attrs.get("key") == key and "features" in group and "computed" in group:
            return group
    except Exception:  # a half-created store from a crash: start again
        pass
    shutil.rmtree(partial, ignore_errors=True)
    return None


class _ChannelSums:
    """Per-channel sums and sums of squares (float64) of feature cells, for mean and std."""

    def __init__(self, d: int) -> None:
        self.total = np.zeros(d, np.float64)
        self.total_sq = np.zeros(d, np.float64)
        self.n = 0

    def add(self, block: NDArray[Any]) -> None:
        """Add the cells of an (h, w, D) block."""
        cells = np.asarray(block, dtype=np.float64).reshape(-1, self.total.shape[0])
        self.total += cells.sum(axis=0)
        self.total_sq += (cells * cells).sum(axis=0)
        self.n += cells.shape[0]

    def add_stored(self, feats_arr: Any, tiles: NDArray[np.bool_], tile_cells: int) -> None:
        """Add the stored cells of the tiles marked in ``tiles`` (ny, nx), read tile by tile."""
        for ty, tx in zip(*np.nonzero(tiles), strict=True):
            y0, x0 = int(ty) * tile_cells, int(tx) * tile_cells
            self.add(np.asarray(feats_arr[y0 : y0 + tile_cells, x0 : x0 + tile_cells]))

    def mean_std(self) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        return _mean_std(self.total, self.total_sq, self.n)


def _channel_stats(
    feats_arr: Any, computed: NDArray[np.bool_], tile_cells: int
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Per-channel mean and standard deviation (D,) over every embedded cell, streamed by tile."""
    sums = _ChannelSums(int(feats_arr.shape[2]))
    sums.add_stored(feats_arr, computed, tile_cells)
    return sums.mean_std()


def _mean_std(
    total: NDArray[np.float64], total_sq: NDArray[np.float64], n: int
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    if n == 0:
        return np.zeros(total.shape, np.float32), np.ones(total.shape, np.float32)
    mean = total / n
    var = np.maximum(total_sq / n - mean * mean, 0.0)
    return mean.astype(np.float32), np.sqrt(var + 1e-6).astype(np.float32)
