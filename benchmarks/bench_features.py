"""Benchmarks for dense features and similarity search (issue 3). Results: docs/benchmarks.md.

    python benchmarks/bench_features.py [--quick] [--device cpu|cuda] [--only NAME ...]

Each comparison runs side by side in one process on the same pixels, because these machines are
noisy. Parts:

* ``pipeline``: end-to-end dense features (read -> normalise -> trunk -> float16 cache) vs the
  bare trunk on the same already-read tiles, MP/s of image area, fp32 and bf16 autocast;
* ``per_window``: the dense map vs cropping and embedding every window separately (64-px
  windows at the 16-px feature stride, and at the paper's 0.1 x patch stride), per MP of area;
* ``query``: a similarity query (5 prototypes x 4 rotations x 3 classes) on a cached map the
  size of a 20x slide (3,000 x 2,500 cells), half of it tissue;
* ``memory``: peak RSS of ``embed`` on a small and a 64x larger synthetic slide (subprocesses).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import (
    AnalysisScale,
    FeatureExtractor,
    analysis_tiles,
    make_feature_spec,
    prepare_pixels,
    read_analysis_region,
)
from simsearch_wsi.features.preprocess import fit_normalization
from simsearch_wsi.io import open_image


def _extractor(device: str, autocast: bool) -> FeatureExtractor:
    trunk, spec, info = build_trunk(weights="random", seed=0)
    return FeatureExtractor(trunk, spec, info, device=device, autocast=autocast)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_pipeline(work: Path, device: str, quick: bool) -> dict[str, Any]:
    from simsearch_wsi.synthetic import make_synthetic_slide

    size = 2048 if quick else 4096
    slide = make_synthetic_slide(
        work / "pipe.tiff", width=size, height=size, n_per_class=20, compression="jpeg", seed=0
    )
    out: dict[str, Any] = {"image_px": [size, size], "tile_size": 1024}
    with open_image(slide.path) as img:
        norm = fit_normalization([img])
        for autocast in (False, True):
            ex = _extractor(device, autocast)
            spec = make_feature_spec(
                img, ex, scale=AnalysisScale.for_level(img, 0), normalization=norm, tile_size=1024
            )
            tiles, _, _ = analysis_tiles(img, spec, mask=None)
            idx = [0, 1, 2]
            read = 1024 + 2 * spec.halo
            batch = np.stack(
                [
                    prepare_pixels(
                        read_analysis_region(
                            img, spec.scale, t.x_a - spec.halo, t.y_a - spec.halo, read, read
                        ),
                        spec,
                        idx=idx,
                    )
                    for t in tiles
                ]
            )
            ex(batch[:1], rgb=True, normalization=spec.normalization)  # warm-up
            area_mp = size * size / 1e6
            runs_bare, runs_pipe = [], []
            for rep in range(2):
                _sync(device)
                t0 = time.perf_counter()
                for i in range(0, len(batch), 2):
                    ex(batch[i : i + 2], rgb=True, normalization=spec.normalization)
                _sync(device)
                runs_bare.append(time.perf_counter() - t0)
                cache = FeatureCache(work / f"cache_{autocast}_{rep}")
                t0 = time.perf_counter()
                cache.get_or_compute(img, ex, spec=spec, batch_size=2)
                _sync(device)
                runs_pipe.append(time.perf_counter() - t0)
            bare, pipe = min(runs_bare), min(runs_pipe)
            out["bf16" if autocast else "fp32"] = {
                "bare_trunk_mp_s": round(area_mp / bare, 2),
                "pipeline_mp_s": round(area_mp / pipe, 2),
                "ratio": round(bare / pipe, 3),
            }
    return out


def bench_per_window(device: str, quick: bool) -> dict[str, Any]:
    """Dense map vs one crop per 64-px window, both per megapixel of slide area.

    Dense: one 1024-px tile core with its halo through the trunk, then Gaussian pooling (what
    ``embed`` + the first query do). Per window: 64 x 64 crops (the window itself, as peers do),
    batched 64 at a time through the same trunk and pooled, at the feature stride (16 px) and at
    the paper's sliding-window stride (0.1 x 64 = 6.4 px); timed on a sample of windows and
    extrapolated to the same area. Both warm, bf16 autocast, min of repeats.
    """
    from simsearch_wsi.search.similarity import PatchGeometry, pool

    ex = _extractor(device, True)
    rng = np.random.default_rng(0)
    geo = PatchGeometry(64, 64, ex.stride)
    kernel = geo.kernel()
    out: dict[str, Any] = {"window_px": 64}
    for core in (1024, 2048):
        side = core + 2 * ex.spec.halo
        tile = rng.random((1, side, side, 3), dtype=np.float32)
        ex(tile[:, :256, :256], rgb=True)
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            pool(ex(tile, rgb=True)[0], kernel)
            _sync(device)
            runs.append(time.perf_counter() - t0)
        out[f"dense_s_per_mp_tile{core}"] = round(min(runs) / (core * core / 1e6), 3)
    dense_s_per_mp = out["dense_s_per_mp_tile1024"]
    crops = rng.random((64, 64, 64, 3), dtype=np.float32)
    ex(crops, rgb=True)
    n_batches = 2 if quick else 6
    t0 = time.perf_counter()
    for _ in range(n_batches):
        f = ex(crops, rgb=True)
        (f * kernel[None, None]).sum(dim=(2, 3))
    _sync(device)
    s_per_window = (time.perf_counter() - t0) / (n_batches * len(crops))
    for stride in (16.0, 6.4):
        windows_per_mp = 1e6 / (stride * stride)
        per_window_s_per_mp = s_per_window * windows_per_mp
        out[f"stride_{stride}"] = {
            "windows_per_mp": round(windows_per_mp),
            "per_window_s_per_mp": round(per_window_s_per_mp, 2),
            "dense_speedup_tile1024": round(per_window_s_per_mp / dense_s_per_mp, 1),
            "dense_speedup_tile2048": round(
                per_window_s_per_mp / out["dense_s_per_mp_tile2048"], 1
            ),
        }
    return out


def bench_query(work: Path, quick: bool) -> dict[str, Any]:
    """Query time on a cached map of a 20x slide's size; features are synthetic float16."""
    import zarr

    from simsearch_wsi.features.cache import FeatureMap
    from simsearch_wsi.features.extractor import FeatureSpec
    from simsearch_wsi.features.preprocess import ChannelNormalization
    from simsearch_wsi.search.similarity import (
        PatchGeometry,
        PrototypeVectors,
        similarity_maps,
    )

    h, w, d, tc = (1000, 800, 256, 64) if quick else (3000, 2500, 256, 64)
    ny, nx = -(-h // tc), -(-w // tc)
    rng = np.random.default_rng(0)
    computed = rng.random((ny, nx)) < 0.5
    path = work / "query_map.zarr"
    group: Any = zarr.open_group(str(path), mode="w")
    arr = group.create_array(
        "features", shape=(h, w, d), chunks=(tc, tc, d), dtype="float16", fill_value=0
    )
    block = rng.standard_normal((tc, tc, d)).astype(np.float16)
    t0 = time.perf_counter()
    for ty, tx in zip(*np.nonzero(computed), strict=True):
        y0, x0 = ty * tc, tx * tc
        arr[y0 : y0 + tc, x0 : x0 + tc] = block[: min(tc, h - y0), : min(tc, w - x0)]
    write_s = time.perf_counter() - t0
    norm = ChannelNormalization((0.0,) * 3, (255.0,) * 3, ("R", "G", "B"), "fixed-range")
    spec = FeatureSpec(
        "resnet18-l3",
        "random:seed0",
        AnalysisScale(0, 1.0, 1.0, 1.0),
        norm,
        ("R", "G", "B"),
        True,
        tc * 16,
        112,
    )
    fmap = FeatureMap(
        path, spec, 16, group["features"], computed, np.zeros(d, np.float32), np.ones(d, np.float32)
    )
    geo = PatchGeometry(64, 64, 16)
    vecs = torch.nn.functional.normalize(torch.randn(3 * 5 * 4, d), dim=1)
    protos = PrototypeVectors(vecs, torch.arange(3).repeat_interleave(20), ("a", "b", "c"))
    t0 = time.perf_counter()
    maps = similarity_maps(fmap, geo, prototypes=protos)  # pools the map once for this patch size
    first_s = time.perf_counter() - t0
    times = {}
    for precision in ("bf16", "fp32"):
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            maps = similarity_maps(fmap, geo, prototypes=protos, precision=precision)
            runs.append(time.perf_counter() - t0)
        times[precision] = round(min(runs), 2)
    return {
        "cells": [h, w],
        "tissue_fraction": round(float(computed.mean()), 2),
        "prototype_vectors": int(vecs.shape[0]),
        "first_query_s": round(first_s, 2),
        "repeat_query_s": times,
        "map_shape": list(maps.shape),
        "cache_write_s": round(write_s, 1),
        "threads": torch.get_num_threads(),
    }


_MEMORY_CHILD = r"""
import resource, sys, time, numpy as np, tifffile
from pathlib import Path
side, level, work = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
path = work / f"mem_{side}.tiff"
tile = 512
rng = np.random.default_rng(0)
base = (rng.random((tile, tile, 3)) * 60 + 170).astype(np.uint8)
def tiles(s):
    for _ in range((s // tile) ** 2):
        yield base
with tifffile.TiffWriter(path, bigtiff=True) as tw:
    n = 4
    tw.write(tiles(side), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile),
             photometric="rgb", compression="jpeg", subifds=n - 1, resolution=(2e4, 2e4),
             resolutionunit="CENTIMETER")
    for k in range(1, n):
        s = side >> k
        tw.write(tiles(s), shape=(s, s, 3), dtype=np.uint8, tile=(tile, tile),
                 photometric="rgb", compression="jpeg", subfiletype=1)
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.extractor import FeatureExtractor, AnalysisScale, make_feature_spec
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.preprocess import fit_normalization
from simsearch_wsi.io import open_image
trunk, spec, info = build_trunk(weights="random", seed=0)
ex = FeatureExtractor(trunk, spec, info, autocast=True)
img = open_image(path)
fspec = make_feature_spec(img, ex, scale=AnalysisScale.for_level(img, level),
                          normalization=fit_normalization([img]), tile_size=1024)
t0 = time.perf_counter()
FeatureCache(work / f"memcache_{side}").get_or_compute(img, ex, spec=fspec, batch_size=2)
print(side, img.levels[level].width * img.levels[level].height / 1e6,
      time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_memory(work: Path, quick: bool) -> dict[str, Any]:
    sides = [(4096, 0), (16384, 2)] if quick else [(4096, 0), (32768, 3), (32768, 2)]
    out: dict[str, Any] = {}
    for side, level in sides:
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, str(side), str(level), str(work)],
            capture_output=True,
            text=True,
            check=True,
        )
        _, mp, secs, rss_kb = proc.stdout.split()
        out[f"{side}x{side}_level{level}"] = {
            "level0_gigapixels": round(int(side) ** 2 / 1e9, 3),
            "embedded_level": level,
            "embedded_mp": round(float(mp), 1),
            "seconds": round(float(secs), 1),
            "peak_rss_mb": round(int(rss_kb) / 1024),
            "level0_uint8_if_loaded_mb": round(int(side) ** 2 * 3 / 2**20),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--only", nargs="*", default=None, choices=["pipeline", "per_window", "query", "memory"]
    )
    args = parser.parse_args()
    parts = args.only or ["pipeline", "per_window", "query", "memory"]
    results: dict[str, Any] = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": __import__("os").cpu_count(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for part in parts:
            t0 = time.perf_counter()
            if part == "pipeline":
                results[part] = bench_pipeline(work, args.device, args.quick)
            elif part == "per_window":
                results[part] = bench_per_window(args.device, args.quick)
            elif part == "query":
                results[part] = bench_query(work, args.quick)
            else:
                results[part] = bench_memory(work, args.quick)
            results[part]["bench_seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps({part: results[part]}), flush=True)
    results["peak_rss_mb_this_process"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
