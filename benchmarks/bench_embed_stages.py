"""Per-stage profile of ``embed`` and its end-to-end throughput against the bare trunk (issue 24).

    python benchmarks/bench_embed_stages.py [--size 3072] [--tile-size 1024] [--batch-size 2]
                                            [--threads N] [--repeats 2] [--device cpu|cuda]
                                            [--fp32] [--json FILE]

On a ``--size`` x ``--size`` synthetic H&E slide with JPEG tiles (the case of the issue), every
stage the embed pipeline (``FeatureCache.get_or_compute``) runs is timed alone, over every tile,
one after the other (no overlap):

* ``foreground``: tissue detection (``detect_foreground``) when the spec embeds foreground tiles;
* ``read``: the compressed bytes of every level-0 tile from the file;
* ``decode``: JPEG decoding of those bytes (``TiffPage.decode``);
* ``read+decode+assemble``: ``read_analysis_region`` of every tile with its halo, as the
  pipeline reads them, from a freshly opened file (halos overlap: without the TIFF reader's
  decoded-tile cache, tiles are decoded more than once);
* ``preprocess``: uint8 -> float, normalisation, channels-last (what ``FeatureExtractor`` does
  before the trunk), step by step and as embed makes it (``FeatureExtractor.prepare``, into
  two reused buffers where the library has them: made and first touched once per embed run,
  timed apart as ``two input buffers``);
* ``trunk``: the trunk alone on the prepared batches (bf16 autocast where it pays off);
* ``post``: halo crop, HWC float16 copy of the features: via an NCHW copy of the trunk's
  output and a torch float16 copy per tile (before), or float16 of the whole batch in the
  trunk's channels-last layout and a numpy copy per tile (after, what embed does);
* ``cache write``: the float16 blocks written to a Zarr array as the cache writes them, with
  zstd at its default level and at level 1 (what the cache uses since issue 24), and at level 1
  as the library's cache writes where it has ``_write_block`` (no float16 comparison in zarr);
* ``channel sums``: the float64 sums the cache adds up while writing (``_ChannelSums.add``);
* ``channel stats``: the per-channel mean and std of the entry read back from the store (since
  issue 24 the cache sums them while writing, and reads back only tiles of an interrupted run).

Every stage reports its wall time (``stages_s``) and the CPU time of the whole process during it
(``stages_cpu_s``, ``time.process_time``: every thread, OpenMP's included), which other jobs on a
shared machine disturb far less than the wall time.

Then the whole pipeline (``get_or_compute`` into a fresh cache) and the bare trunk run
``--repeats`` times, interleaved, and the minimum of each is kept: MP/s counts slide area (the
tiles' cores), ``ratio`` = bare-trunk time / pipeline time (1.0 = the pipeline costs nothing
beyond the trunk); ``pipeline_cpu_s`` and ``bare_trunk_cpu_s`` are the process CPU times of
the same runs, and ``cpu_around_trunk_s`` the difference of their minima: the CPU work the
pipeline adds to the trunk. Timings on a shared machine move between runs: compare within one
run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simsearch_wsi.features import cache as cache_module
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache, _channel_stats
from simsearch_wsi.features.extractor import (
    AnalysisScale,
    FeatureExtractor,
    analysis_tiles,
    make_feature_spec,
    prepare_pixels,
    read_analysis_region,
    trunk_input,
)
from simsearch_wsi.features.preprocess import fit_normalization
from simsearch_wsi.features.tissue import detect_foreground
from simsearch_wsi.io import open_image


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    wall, _, out = _timed_cpu(fn, device)
    return wall, out


def _timed_cpu(fn: Callable[[], Any], device: str) -> tuple[float, float, Any]:
    """(wall s, process CPU s, result) of ``fn()``."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import tifffile
    import zarr

    from simsearch_wsi.synthetic import make_synthetic_slide

    size, t = args.size, args.tile_size
    slide = make_synthetic_slide(
        work / "slide.tiff", width=size, height=size, n_per_class=20, compression="jpeg", seed=0
    )
    trunk, bspec, info = build_trunk(weights="random", seed=0)
    ex = FeatureExtractor(trunk, bspec, info, device=args.device, autocast=not args.fp32)
    dev = args.device
    out: dict[str, Any] = {
        "image_px": [size, size],
        "tile_size": t,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "device": dev,
        "precision": ex.precision,
    }
    stages: dict[str, float] = {}
    stages_cpu: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        stages[name], stages_cpu[name], result = _timed_cpu(fn, dev)
        return result

    with open_image(slide.path) as img:
        norm = fit_normalization([img])
        spec = make_feature_spec(
            img, ex, scale=AnalysisScale.for_level(img, 0), normalization=norm, tile_size=t
        )
        if spec.tiles == "foreground":
            mask = stage("foreground", lambda: detect_foreground(img))
        else:
            mask = None
        tiles, _, _ = analysis_tiles(img, spec, mask=mask)
        out["tiles"] = len(tiles)
        area_mp = sum(tl.width_a * tl.height_a for tl in tiles) / 1e6
        out["area_mp"] = round(area_mp, 3)

        with tifffile.TiffFile(slide.path) as tf:
            page: Any = tf.pages[0]
            fh = tf.filehandle
            spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))

            def read_bytes() -> list[bytes]:
                chunks = []
                for offset, count in spans:
                    fh.seek(offset)
                    chunks.append(fh.read(count))
                return chunks

            raw_tiles = stage("read", read_bytes)
            stage(
                "decode",
                lambda: [
                    page.decode(b, i, jpegtables=page.jpegtables)[0]
                    for i, b in enumerate(raw_tiles)
                ],
            )

        halo, side, idx = spec.halo, t + 2 * spec.halo, [0, 1, 2]

        def read_all() -> list[np.ndarray]:
            # a freshly opened file, as each embed run reads from a new thread: no tile decoded
            # by an earlier stage is reused
            with open_image(slide.path) as fresh:
                fresh.read_region((0, 0), 0, (1, 1))  # opens the level arrays (not timed apart)
                return [
                    prepare_pixels(
                        read_analysis_region(
                            fresh, spec.scale, tl.x_a - halo, tl.y_a - halo, side, side
                        ),
                        spec,
                        idx=idx,
                    )
                    for tl in tiles
                ]

        pixels = stage("read+decode+assemble", read_all)
        b = args.batch_size
        batches = [np.stack(pixels[i : i + b]) for i in range(0, len(pixels), b)]

        def preprocess(batch: np.ndarray) -> torch.Tensor:
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(ex.device)
            x = x.permute(0, 3, 1, 2).float()
            low = torch.tensor(norm.low, dtype=torch.float32, device=ex.device)
            span = torch.tensor(norm.high, dtype=torch.float32, device=ex.device) - low
            x = ((x - low.view(1, -1, 1, 1)) / span.view(1, -1, 1, 1)).clamp_(0.0, 1.0)
            x = trunk_input(x, bspec, rgb=True)
            return x.contiguous(memory_format=torch.channels_last)

        def preprocess_as_pipeline() -> list[torch.Tensor]:
            return [ex.prepare(x, rgb=True, normalization=norm).x for x in batches]

        buffers: list[torch.Tensor] = []

        def make_buffers() -> None:
            # as iter_tile_features since issue 24: two buffers per embed run, used in turn;
            # first touched here (their page faults), as the first two batches touch them
            shape = (b, 3, side, side)
            buffers.extend(torch.empty(shape, memory_format=torch.channels_last) for _ in "ab")
            for buf in buffers:
                buf.zero_()

        def preprocess_into_buffers() -> None:
            for i, x in enumerate(batches):
                ex.prepare(x, rgb=True, normalization=norm, buffer=buffers[i % 2])

        with torch.inference_mode():
            prepared = stage("preprocess (step by step)", lambda: [preprocess(x) for x in batches])
            if "buffer" in inspect.signature(ex.prepare).parameters:  # since issue 24
                stage("preprocess: two input buffers, once per run", make_buffers)
                stage("preprocess (as embed)", preprocess_into_buffers)
                prepared = preprocess_as_pipeline()  # not timed: one tensor per batch
            elif hasattr(ex, "prepare"):  # issue 24; absent in older code
                prepared = stage("preprocess (as embed)", preprocess_as_pipeline)

            def bare() -> list[torch.Tensor]:
                with torch.autocast(ex.device.type, dtype=ex.autocast_dtype, enabled=ex.autocast):
                    return [ex.trunk(x) for x in prepared]

            bare()  # warm-up
            feats = stage("trunk", bare)
            s, c0 = ex.stride, halo // ex.stride

            def post(before: bool) -> list[np.ndarray]:
                blocks = []
                for f in feats:
                    # before: an NCHW copy, then a float16 HWC copy of each tile by torch (in
                    # the cache's writer thread); after: float16 in the trunk's layout (in
                    # the trunk's thread), then a numpy HWC copy of each tile (writer)
                    f = f.contiguous().cpu() if before else f.to(torch.float16).cpu()
                    for one in f:
                        core = one[:, c0 : c0 + t // s, c0 : c0 + t // s].permute(1, 2, 0)
                        if before:
                            blocks.append(np.ascontiguousarray(core.to(torch.float16).numpy()))
                        else:
                            blocks.append(np.ascontiguousarray(core.numpy()))
                return blocks

            blocks = stage("post, via an NCHW copy (before)", lambda: post(True))
            blocks_cl = stage("post, float16 in the trunk's layout (after)", lambda: post(False))
            assert all(np.array_equal(a, b) for a, b in zip(blocks, blocks_cl, strict=True))

        tc, d = t // s, blocks[0].shape[2]
        group = zarr.open_group(str(work / "write_only.zarr"), mode="w")
        write_block = getattr(cache_module, "_write_block", None)  # issue 24; absent before
        for label, codec, as_cache in (
            ("zstd default level", "auto", False),
            ("zstd level 1", zarr.codecs.ZstdCodec(level=1), False),
            ("zstd level 1, as embed", zarr.codecs.ZstdCodec(level=1), True),
        ):
            if as_cache and write_block is None:
                continue
            arr = group.create_array(
                label.replace(" ", "_").replace(",", ""),
                shape=(-(-size // s), -(-size // s), d),
                chunks=(tc, tc, d),
                dtype="float16",
                fill_value=0,
                compressors=codec,
            )
            if as_cache:
                arr = arr.with_config({"write_empty_chunks": True})

            def write(arr: Any = arr, as_cache: bool = as_cache) -> None:
                for tl, block in zip(tiles, blocks, strict=True):
                    y0, x0 = tl.index_y * tc, tl.index_x * tc
                    h, w = -(-tl.height_a // s), -(-tl.width_a // s)
                    if as_cache and write_block is not None:
                        write_block(arr, y0, x0, block[:h, :w])
                    else:
                        arr[y0 : y0 + h, x0 : x0 + w] = block[:h, :w]

            stage(f"cache write ({label})", write)

        def sums() -> None:
            acc = cache_module._ChannelSums(d)
            for block in blocks:
                acc.add(block)

        stage("channel sums (while writing)", sums)
        computed = np.zeros((max(tl.index_y for tl in tiles) + 1,) * 2, bool)
        for tl in tiles:
            computed[tl.index_y, tl.index_x] = True
        stage("channel stats (read back)", lambda: _channel_stats(arr, computed, tc))
        out["stages_s"] = {k: round(v, 3) for k, v in stages.items()}
        out["stages_cpu_s"] = {k: round(v, 3) for k, v in stages_cpu.items()}

        runs_bare, runs_pipe, cpu_bare, cpu_pipe = [], [], [], []
        for rep in range(args.repeats):
            with torch.inference_mode():
                wall, cpu, _ = _timed_cpu(bare, dev)
            runs_bare.append(wall)
            cpu_bare.append(cpu)
            cache = FeatureCache(work / f"cache_{rep}")
            wall, cpu, _ = _timed_cpu(
                lambda c=cache: c.get_or_compute(img, ex, spec=spec, batch_size=b), dev
            )
            runs_pipe.append(wall)
            cpu_pipe.append(cpu)
        t_bare, t_pipe = min(runs_bare), min(runs_pipe)
        out["bare_trunk_s"] = [round(v, 3) for v in runs_bare]
        out["pipeline_s"] = [round(v, 3) for v in runs_pipe]
        out["bare_trunk_cpu_s"] = [round(v, 3) for v in cpu_bare]
        out["pipeline_cpu_s"] = [round(v, 3) for v in cpu_pipe]
        out["cpu_around_trunk_s"] = round(min(cpu_pipe) - min(cpu_bare), 3)
        out["bare_trunk_mp_s"] = round(area_mp / t_bare, 2)
        out["pipeline_mp_s"] = round(area_mp / t_pipe, 2)
        out["ratio"] = round(t_bare / t_pipe, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=3072)
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fp32", action="store_true", help="no autocast")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
