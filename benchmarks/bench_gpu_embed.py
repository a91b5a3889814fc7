"""GPU throughput of ``embed``: the trunk alone vs the whole pipeline, side by side (issue 24).

    python benchmarks/bench_gpu_embed.py [--device cuda] [--size 8192] [--tile-size 1024]
                                         [--batch-sizes 4 8 16] [--budget-s 480] [--compile]
                                         [--quick] [--json FILE]

Sized to finish inside 10 minutes on one H100-class GPU (``--budget-s`` stops adding
configurations once spent; slide synthesis on the CPU comes first and counts). Parts, in MP/s of
level-0 slide area (tile cores; the trunk also sees the halos):

* ``trunk``: the trunk alone on uint8 tiles already on the GPU (fused normalisation included),
  for each batch size, fp16 and bf16 autocast, channels-last and contiguous;
  ``--compile`` adds ``torch.compile`` of the trunk (its compile time is reported);
* ``pipeline``: ``FeatureCache.get_or_compute`` on a ``--size`` x ``--size`` synthetic H&E slide
  with JPEG tiles (foreground detection, read and decode, transfer, trunk, float16 cache writes,
  statistics) with the project's extractor on the device, for each batch size, against the bare
  trunk on the same tiles in the same run (``ratio`` = bare time / pipeline time).

The goal in the issue: the pipeline decode-bound at >= 500 MP/s on one H100 with bf16. Runs on a
CPU too (``--device cpu --quick``) to check the script; CPU figures come from
``bench_embed_stages.py``.
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
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import (
    AnalysisScale,
    FeatureExtractor,
    analysis_tiles,
    make_feature_spec,
    prepare_pixels,
    read_analysis_region,
)
from simsearch_wsi.features.preprocess import ChannelNormalization, fit_normalization
from simsearch_wsi.io import open_image


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_of(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (cuDNN autotuning, allocator)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_trunk(args: argparse.Namespace, device: torch.device, left: Callable[[], float]) -> Any:
    side = args.tile_size + 2 * 112  # the halo of the default trunk at 1024-px tiles
    core_mp = args.tile_size**2 / 1e6
    rows = []
    variants = [("fp16", True), ("bf16", True), ("bf16", False)]
    if device.type == "cpu":
        variants = [("bf16", True)]
    for batch in args.batch_sizes:
        x_u8 = torch.randint(0, 256, (batch, side, side, 3), dtype=torch.uint8, device=device)
        for dtype_name, channels_last in variants:
            if left() <= 0:
                return rows
            trunk, spec, info = build_trunk(weights="random", seed=0)
            ex = FeatureExtractor(trunk, spec, info, device=device, channels_last=channels_last)
            ex.autocast_dtype = torch.float16 if dtype_name == "fp16" else torch.bfloat16
            ex.autocast = True
            norm = ChannelNormalization(
                low=(0.0, 0.0, 0.0),
                high=(255.0, 255.0, 255.0),
                channel_names=("R", "G", "B"),
                method="fixed-range",
            )

            @torch.inference_mode()
            def step(ex: FeatureExtractor = ex, norm: Any = norm, x_u8: Any = x_u8) -> Any:
                x = ex._fused_rgb_input(x_u8.permute(0, 3, 1, 2), norm)
                assert x is not None
                if ex.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=ex.autocast_dtype):
                    return ex.trunk(x)

            t = _best_of(step, device, args.repeats)
            rows.append(
                {
                    "batch": batch,
                    "autocast": dtype_name,
                    "channels_last": channels_last,
                    "mp_s": round(batch * core_mp / t, 1),
                    "input_mp_s": round(batch * side * side / 1e6 / t, 1),
                }
            )
            print(json.dumps({"trunk": rows[-1]}), flush=True)
        if args.compile and left() > 120:
            trunk, spec, info = build_trunk(weights="random", seed=0)
            ex = FeatureExtractor(trunk, spec, info, device=device)
            t0 = time.perf_counter()
            ex.trunk = torch.compile(ex.trunk)  # type: ignore[assignment]
            x = torch.rand(batch, 3, side, side, device=device).contiguous(
                memory_format=torch.channels_last
            )

            @torch.inference_mode()
            def compiled(ex: FeatureExtractor = ex, x: Any = x) -> Any:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    return ex.trunk(x)

            compiled()
            _sync(device)
            compile_s = time.perf_counter() - t0
            t = _best_of(compiled, device, args.repeats)
            rows.append(
                {
                    "batch": batch,
                    "autocast": "bf16",
                    "compiled": True,
                    "compile_s": round(compile_s, 1),
                    "mp_s": round(batch * core_mp / t, 1),
                }
            )
            print(json.dumps({"trunk": rows[-1]}), flush=True)
    return rows


def bench_pipeline(
    args: argparse.Namespace, device: torch.device, work: Path, left: Callable[[], float]
) -> Any:
    from simsearch_wsi.synthetic import make_synthetic_slide

    t0 = time.perf_counter()
    slide = make_synthetic_slide(
        work / "slide.tiff",
        width=args.size,
        height=args.size,
        n_per_class=max(20, args.size // 100),
        compression="jpeg",
        seed=0,
    )
    rows: list[dict[str, Any]] = [{"slide_s": round(time.perf_counter() - t0, 1)}]
    trunk, spec_b, info = build_trunk(weights="random", seed=0)
    ex = FeatureExtractor(trunk, spec_b, info, device=device)
    with open_image(slide.path) as img:
        norm = fit_normalization([img])
        spec = make_feature_spec(
            img,
            ex,
            scale=AnalysisScale.for_level(img, 0),
            normalization=norm,
            tile_size=args.tile_size,
        )
        tiles, _, _ = analysis_tiles(img, spec, mask=None)
        area_mp = sum(tl.width_a * tl.height_a for tl in tiles) / 1e6
        halo, side = spec.halo, args.tile_size + 2 * spec.halo
        pixels = np.stack(
            [
                prepare_pixels(
                    read_analysis_region(img, spec.scale, tl.x_a - halo, tl.y_a - halo, side, side),
                    spec,
                    idx=[0, 1, 2],
                )
                for tl in tiles
            ]
        )
        on_device = torch.from_numpy(pixels).to(device)
        runs = [(b, ex.autocast_dtype) for b in args.batch_sizes]
        if device.type == "cuda":  # the project's CUDA default is fp16: bf16 at the largest batch
            runs.append((max(args.batch_sizes), torch.bfloat16))
        for batch, autocast_dtype in runs:
            if left() <= 0:
                break
            ex.autocast_dtype = autocast_dtype

            @torch.inference_mode()
            def bare(batch: int = batch) -> None:
                for i in range(0, len(on_device), batch):
                    x = ex._fused_rgb_input(on_device[i : i + batch].permute(0, 3, 1, 2), norm)
                    assert x is not None
                    x = x.contiguous(memory_format=torch.channels_last)
                    with torch.autocast(device.type, dtype=ex.autocast_dtype, enabled=ex.autocast):
                        ex.trunk(x)

            t_bare = _best_of(bare, device, 2)
            pipe_times = []
            for rep in range(2):
                cache = FeatureCache(work / f"cache_{batch}_{autocast_dtype}_{rep}")
                _sync(device)
                t1 = time.perf_counter()
                cache.get_or_compute(img, ex, spec=spec, batch_size=batch)
                _sync(device)
                pipe_times.append(time.perf_counter() - t1)
            t_pipe = min(pipe_times)
            rows.append(
                {
                    "batch": batch,
                    "precision": ex.precision,
                    "tiles": len(tiles),
                    "area_mp": round(area_mp, 1),
                    "bare_trunk_mp_s": round(area_mp / t_bare, 1),
                    "pipeline_mp_s": round(area_mp / t_pipe, 1),
                    "ratio": round(t_bare / t_pipe, 3),
                }
            )
            print(json.dumps({"pipeline": rows[-1]}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--quick", action="store_true", help="a 2048 px slide, batch 2: a check")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.size, args.batch_sizes, args.repeats = 2048, [2], 1
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    start = time.perf_counter()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - start)

    result: dict[str, Any] = {"device": str(device), "args": vars(args)}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    with tempfile.TemporaryDirectory() as tmp:
        result["pipeline"] = bench_pipeline(args, device, Path(tmp), left)
    result["trunk"] = bench_trunk(args, device, left)
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
