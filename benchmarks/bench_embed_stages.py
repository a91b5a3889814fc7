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
  pipeline reads them (halos overlap, so tiles are decoded more than once);
* ``preprocess``: uint8 -> float, normalisation, channels-last (what ``FeatureExtractor`` does
  before the trunk), step by step and, where the code has it, in the fused pass embed uses;
* ``trunk``: the trunk alone on the prepared batches (bf16 autocast where it pays off);
* ``post``: halo crop, HWC float16 copy of the features;
* ``cache write``: the float16 blocks written to a Zarr array as the cache writes them, with
  zstd at its default level and at level 1 (what the cache uses since issue 24);
* ``channel stats``: the per-channel mean and std of the entry read back from the store (since
  issue 24 the cache sums them while writing, and reads back only tiles of an interrupted run).

Then the whole pipeline (``get_or_compute`` into a fresh cache) and the bare trunk run
``--repeats`` times, interleaved, and the minimum of each is kept: MP/s counts slide area (the
tiles' cores), ``ratio`` = bare-trunk time / pipeline time (1.0 = the pipeline costs nothing
beyond the trunk). Timings on a shared machine move between runs: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


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
    with open_image(slide.path) as img:
        norm = fit_normalization([img])
        spec = make_feature_spec(
            img, ex, scale=AnalysisScale.for_level(img, 0), normalization=norm, tile_size=t
        )
        if spec.tiles == "foreground":
            stages["foreground"], mask = _timed(lambda: detect_foreground(img), dev)
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

            stages["read"], raw_tiles = _timed(read_bytes, dev)
            stages["decode"], _ = _timed(
                lambda: [
                    page.decode(b, i, jpegtables=page.jpegtables)[0]
                    for i, b in enumerate(raw_tiles)
                ],
                dev,
            )

        halo, side, idx = spec.halo, t + 2 * spec.halo, [0, 1, 2]

        def read_all() -> list[np.ndarray]:
            return [
                prepare_pixels(
                    read_analysis_region(img, spec.scale, tl.x_a - halo, tl.y_a - halo, side, side),
                    spec,
                    idx=idx,
                )
                for tl in tiles
            ]

        stages["read+decode+assemble"], pixels = _timed(read_all, dev)
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

        fused = getattr(ex, "_fused_rgb_input", None)  # issue 24; absent in older code

        def preprocess_as_pipeline(batch: np.ndarray) -> torch.Tensor:
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(ex.device).permute(0, 3, 1, 2)
            y = fused(x, norm) if fused is not None else None
            if y is None:
                return preprocess(batch)
            return y.contiguous(memory_format=torch.channels_last)

        with torch.inference_mode():
            stages["preprocess (step by step)"], prepared = _timed(
                lambda: [preprocess(x) for x in batches], dev
            )
            if fused is not None:
                stages["preprocess (fused, as embed)"], prepared = _timed(
                    lambda: [preprocess_as_pipeline(x) for x in batches], dev
                )

            def bare() -> list[torch.Tensor]:
                with torch.autocast(ex.device.type, dtype=ex.autocast_dtype, enabled=ex.autocast):
                    return [ex.trunk(x) for x in prepared]

            bare()  # warm-up
            stages["trunk"], feats = _timed(bare, dev)
            s, c0 = ex.stride, halo // ex.stride

            def post() -> list[np.ndarray]:
                blocks = []
                for f in feats:
                    f = f.float().cpu()
                    for one in f:
                        core = one[:, c0 : c0 + t // s, c0 : c0 + t // s]
                        blocks.append(core.permute(1, 2, 0).numpy().astype(np.float16))
                return blocks

            stages["post"], blocks = _timed(post, dev)

        tc, d = t // s, blocks[0].shape[2]
        group = zarr.open_group(str(work / "write_only.zarr"), mode="w")
        for label, codec in (
            ("zstd default level", "auto"),
            ("zstd level 1", zarr.codecs.ZstdCodec(level=1)),
        ):
            arr = group.create_array(
                label.replace(" ", "_"),
                shape=(-(-size // s), -(-size // s), d),
                chunks=(tc, tc, d),
                dtype="float16",
                fill_value=0,
                compressors=codec,
            )

            def write(arr: Any = arr) -> None:
                for tl, block in zip(tiles, blocks, strict=True):
                    y0, x0 = tl.index_y * tc, tl.index_x * tc
                    h, w = -(-tl.height_a // s), -(-tl.width_a // s)
                    arr[y0 : y0 + h, x0 : x0 + w] = block[:h, :w]

            stages[f"cache write ({label})"], _ = _timed(write, dev)
        computed = np.zeros((max(tl.index_y for tl in tiles) + 1,) * 2, bool)
        for tl in tiles:
            computed[tl.index_y, tl.index_x] = True
        stages["channel stats"], _ = _timed(lambda: _channel_stats(arr, computed, tc), dev)
        out["stages_s"] = {k: round(v, 3) for k, v in stages.items()}

        runs_bare, runs_pipe = [], []
        for rep in range(args.repeats):
            with torch.inference_mode():
                runs_bare.append(_timed(bare, dev)[0])
            cache = FeatureCache(work / f"cache_{rep}")
            runs_pipe.append(
                _timed(lambda c=cache: c.get_or_compute(img, ex, spec=spec, batch_size=b), dev)[0]
            )
        t_bare, t_pipe = min(runs_bare), min(runs_pipe)
        out["bare_trunk_s"] = [round(v, 3) for v in runs_bare]
        out["pipeline_s"] = [round(v, 3) for v in runs_pipe]
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
