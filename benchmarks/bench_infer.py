"""Benchmarks for inference and its outputs (issue 6). Results: docs/benchmarks.md.

    python benchmarks/bench_infer.py [--quick] [--device cpu|cuda] [--precision both|bf16|fp32]
                                     [--only dense per_window outputs] [--json FILE]

Each comparison runs side by side in one process on the same pixels, because these machines are
noisy. The model is ``infer.untrained_bundle`` (seeded random trunk and head): timing does not
depend on the weights. Parts:

* ``dense``: ``infer.dense_class_maps`` (foreground detection, read, trunk, head per feature
  cell, pooling, softmax) vs the bare trunk on the same already-read foreground tiles, and vs
  ``features.iter_tile_features`` (read + trunk), in level-0 MP/s of the embedded tiles; repeats
  interleaved, fp32 and autocast (bf16 on CPU, fp16 on CUDA);
* ``per_window``: ``train.predict_patches`` (the bundle's classifier on individually cropped
  windows with the bundle's context) timed on a sample of windows and **extrapolated** to every
  window of the same slide, at the dense map's 16-px window stride and at the paper's 0.1 x
  patch stride, vs the measured ``dense_class_maps`` time; also vs the bundle's encoder alone
  on random crops (no reading), a lower bound for any per-window classifier;
* ``outputs``: every writer of ``predict`` on a 32,000 x 32,000 px slide's worth of results:
  100,000 synthetic detections and the 8,000 x 8,000 segmentation that ``segment`` makes from
  synthetic class maps (3 classes + background), each writer timed with its peak RSS, and the
  total compared with the dense inference time of such a slide (extrapolated from ``dense``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from numpy.typing import NDArray

from simsearch_wsi.features.extractor import (
    AnalysisScale,
    analysis_tiles,
    iter_tile_features,
    make_feature_spec,
    prepare_pixels,
    read_analysis_region,
)
from simsearch_wsi.features.tissue import detect_foreground
from simsearch_wsi.infer.dense import PatchModel, dense_class_maps, untrained_bundle
from simsearch_wsi.io import open_image
from simsearch_wsi.io.base import ImageMetadata, ImageSource, levels_from_shapes
from simsearch_wsi.search.similarity import PatchGeometry
from simsearch_wsi.train.bundle import ModelBundle

T = TypeVar("T")
CLASSES = ("tumour", "stroma", "necrosis", "background")
COLORS = {"tumour": (200, 0, 0), "stroma": (0, 150, 0), "necrosis": (60, 60, 200)}
PATCH_PX = 64.0  # level-0 px: lands at analysis scale 1 (TARGET_PATCH_PX), as in bench_features
MPP = 0.5


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _precisions(choice: str) -> list[bool]:
    """autocast flags to run, fp32 first."""
    return {"both": [False, True], "fp32": [False], "bf16": [True]}[choice]


def _label(autocast: bool) -> str:
    return "autocast" if autocast else "fp32"


def _bundle(slide_path: Path, *, context_a: int) -> ModelBundle:
    """An untrained bundle (seeded random trunk and head) for ``PATCH_PX`` patches."""
    with open_image(slide_path) as image:
        return untrained_bundle(
            [image], classes=CLASSES, patch_size_l0=PATCH_PX, context_a=context_a, threshold=0.5
        )


# --- dense maps vs the bare trunk ----------------------------------------------------------------


def bench_dense(
    work: Path, device: str, precisions: list[bool], *, quick: bool, repeats: int, context_a: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns the results and, for ``per_window``, the slide, bundle and dense times."""
    from simsearch_wsi.synthetic import make_synthetic_slide

    size = 2048 if quick else 4096
    slide = make_synthetic_slide(
        work / "dense.tiff", width=size, height=size, n_per_class=20, compression="jpeg", seed=0
    )
    bundle = _bundle(slide.path, context_a=context_a)
    batch_size, tile_size = 4, 1024  # dense_class_maps' defaults
    out: dict[str, Any] = {
        "image_px": [size, size],
        "patch_px": PATCH_PX,
        "tile_size": tile_size,
        "batch_size": batch_size,
        "repeats": repeats,
    }
    state: dict[str, Any] = {"slide": slide, "bundle": bundle, "dense_s": {}}
    with open_image(slide.path) as img:
        for autocast in precisions:
            model = PatchModel(bundle, device=device, autocast=autocast)
            ex = model.extractor
            scale = AnalysisScale.for_patch(img, PATCH_PX)
            spec = make_feature_spec(
                img,
                ex,
                scale=scale,
                normalization=bundle.channel_normalization(),
                channels=list(bundle.channels),
                tile_size=tile_size,
                tiles="foreground",
            )
            # fixed per-image costs inside dense_class_maps (not in the two baselines)
            t0 = time.perf_counter()
            mask = detect_foreground(img)
            t1 = time.perf_counter()
            grid, ny, nx = analysis_tiles(img, spec, mask=mask)
            fixed = {"detect_foreground_s": t1 - t0, "analysis_tiles_s": time.perf_counter() - t1}
            halo, read = spec.halo, tile_size + 2 * spec.halo
            tiles = np.stack(
                [
                    prepare_pixels(
                        read_analysis_region(
                            img, spec.scale, t.x_a - halo, t.y_a - halo, read, read
                        ),
                        spec,
                        idx=[0, 1, 2],
                    )
                    for t in grid
                ]
            )
            area_mp = (
                sum(t.width_a * t.height_a for t in grid)
                * scale.downsample_x
                * scale.downsample_y
                / 1e6
            )
            # warm-up (and the maps for per_window)
            ex(tiles[:1], rgb=True, normalization=spec.normalization)
            maps = dense_class_maps(img, model, tile_size=tile_size, batch_size=batch_size)
            runs: dict[str, list[float]] = {"bare": [], "tiles": [], "dense": []}
            for _ in range(repeats):  # interleaved
                _sync(device)
                t0 = time.perf_counter()
                for i in range(0, len(tiles), batch_size):
                    ex(tiles[i : i + batch_size], rgb=True, normalization=spec.normalization)
                _sync(device)
                runs["bare"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for _tl, _f in iter_tile_features(
                    img, ex, spec=spec, tiles=grid, batch_size=batch_size
                ):
                    pass
                _sync(device)
                runs["tiles"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                dense_class_maps(img, model, tile_size=tile_size, batch_size=batch_size)
                _sync(device)
                runs["dense"].append(time.perf_counter() - t0)
            best = {k: min(v) for k, v in runs.items()}
            out["tiles_embedded"] = f"{len(grid)} of {ny * nx}"
            out["embedded_mp"] = round(area_mp, 2)
            out[_label(autocast)] = {
                "bare_trunk_mp_s": round(area_mp / best["bare"], 2),
                "read_and_trunk_mp_s": round(area_mp / best["tiles"], 2),
                "dense_class_maps_mp_s": round(area_mp / best["dense"], 2),
                "dense_over_bare": round(best["bare"] / best["dense"], 3),
                "dense_over_read_and_trunk": round(best["tiles"] / best["dense"], 3),
                "dense_s": round(best["dense"], 3),
                **{k: round(v, 3) for k, v in fixed.items()},
                "all_runs_s": {k: [round(x, 3) for x in v] for k, v in runs.items()},
            }
            state["dense_s"][autocast] = best["dense"]
            state[f"maps_{autocast}"] = maps
            state[f"mp_s_{autocast}"] = area_mp / best["dense"]
    return out, state


# --- dense vs the per-window classifier ----------------------------------------------------------


def bench_per_window(
    device: str, autocast: bool, state: dict[str, Any], *, n_windows: int
) -> dict[str, Any]:
    """``predict_patches`` on ``n_windows`` windows sampled from the slide's dense map, each
    cropped with the bundle's context; extrapolated to every window of the slide."""
    from simsearch_wsi.infer.dense import predict_patches
    from simsearch_wsi.train.patches import PatchSample, PatchSet

    slide, bundle = state["slide"], state["bundle"]
    maps = state[f"maps_{autocast}"]
    dense_s = state["dense_s"][autocast]
    finite = np.isfinite(maps.probabilities).all(axis=0)
    cells = np.argwhere(finite)
    rng = np.random.default_rng(0)
    pick = cells[rng.choice(len(cells), min(n_windows, len(cells)), replace=False)]
    key = str(Path(slide.path).resolve())
    samples = tuple(
        PatchSample(key, maps.window_box_l0(float(i), float(j)).center_l0, 0) for i, j in pick
    )

    def run(s: tuple[PatchSample, ...]) -> float:
        _sync(device)
        t0 = time.perf_counter()
        predict_patches(
            bundle,
            PatchSet(s, CLASSES),
            open_image=lambda p: open_image(p),
            device=device,
            autocast=autocast,
        )
        _sync(device)
        return time.perf_counter() - t0

    run(samples[:16])  # warm-up
    s_per_window = min(run(samples), run(samples)) / len(samples)
    crop_a = round(maps.geometry.width_a) + 2 * bundle.context_a
    s_trunk = _per_window_model_only(bundle, device, autocast, crop_a, n_batches=4)
    out: dict[str, Any] = {
        "precision": _label(autocast),
        "sampled_windows": len(samples),
        "crop_px": crop_a,
        "context_px": bundle.context_a,
        "per_window_ms": round(1e3 * s_per_window, 3),
        "model_only_ms": round(1e3 * s_trunk, 3),
        "dense_class_maps_s": round(dense_s, 3),
    }
    geo = maps.geometry
    for name, stride in (
        ("feature_stride", float(geo.stride)),
        ("paper_stride", geo.window_stride_a),
    ):
        n_all = int(finite.sum() * (geo.stride / stride) ** 2)
        per_window_s = n_all * s_per_window
        out[name] = {
            "stride_px": round(stride, 2),
            "windows": n_all,
            "per_window_s_extrapolated": round(per_window_s, 1),
            "dense_speedup": round(per_window_s / dense_s, 1),
            "dense_speedup_vs_model_only": round(n_all * s_trunk / dense_s, 1),
        }
    return out


def _per_window_model_only(
    bundle: ModelBundle, device: str, autocast: bool, crop: int, *, n_batches: int
) -> float:
    """Seconds per window of the bundle's encoder alone (trunk + pooling, no reading) on
    batches of 64 random crops: a lower bound for any per-window classifier."""
    from simsearch_wsi.train.model import PatchEncoder

    trunk, spec = bundle.build_trunk()
    trunk = trunk.to(device).to(memory_format=torch.channels_last)
    geometry = PatchGeometry(**bundle.geometry)
    encoder = PatchEncoder(trunk, spec, geometry=geometry, rgb=True, context_a=bundle.context_a)
    encoder = encoder.to(device)
    encoder.eval()
    x = torch.rand(64, 3, crop, crop, generator=torch.Generator().manual_seed(0)).to(device)
    dev = torch.device(device).type
    times = []
    with torch.no_grad():
        for step in range(n_batches + 1):
            _sync(device)
            t0 = time.perf_counter()
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
                encoder(x).float().cpu()
            _sync(device)
            if step:  # the first batch warms up
                times.append(time.perf_counter() - t0)
    return min(times) / len(x)


# --- writers -------------------------------------------------------------------------------------


class _VirtualSlide(ImageSource):
    """A slide of any level-0 size whose coarse levels (<= ``keep_pixels``) are held in memory;
    reading a finer level raises. Enough for the overlay and the DAB overview, which read one
    coarse level whole, without writing a 1-gigapixel file."""

    def __init__(self, side: int, *, keep_pixels: int = 4_000_000) -> None:
        shapes = [(side >> k, side >> k) for k in range(8) if (side >> k) >= 256]
        rng = np.random.default_rng(1)
        self._held = {
            k: (rng.random((h, w, 3)) * 60 + 170).astype(np.uint8)
            for k, (h, w) in enumerate(shapes)
            if h * w <= keep_pixels
        }
        meta = ImageMetadata(
            format="virtual",
            levels=levels_from_shapes(shapes),
            dtype=np.dtype(np.uint8),
            channel_names=("R", "G", "B"),
            modality="brightfield",
            mpp=MPP,
            mpp_source="metadata",
            bit_depth=8,
        )
        super().__init__(Path(f"virtual_{side}.tiff"), meta)

    def _read_window(self, level: int, x0: int, y0: int, x1: int, y1: int) -> NDArray[Any]:
        if level not in self._held:
            raise RuntimeError(f"the benchmark's virtual slide does not hold level {level}")
        return self._held[level][y0:y1, x0:x1].copy()


def _rss_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


_PROCESS_PEAK_MB = [0.0]  # the process's peak RSS before each reset


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux ``clear_refs`` 5); False where that is refused."""
    _PROCESS_PEAK_MB[0] = max(_PROCESS_PEAK_MB[0], _rss_mb("VmHWM") or 0.0)
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(fn: Callable[[], T]) -> tuple[T, dict[str, Any]]:
    """``fn()``, its seconds and its peak RSS above the RSS it started from (MB)."""
    gc.collect()
    can_reset = _reset_peak_rss()
    start = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    peak = _rss_mb("VmHWM") if can_reset else None
    extra = None if peak is None or start is None else round(peak - start)
    return result, {"seconds": round(seconds, 2), "peak_rss_above_start_mb": extra}


def _synthetic_maps(side: int, rng: np.random.Generator, sigma_cells: float) -> Any:
    """Class maps of a ``side`` x ``side`` slide (64-px windows, 16-px stride, scale 1) from
    smooth random logits: blobs of each class, about half of the area background."""
    from scipy.ndimage import gaussian_filter

    from simsearch_wsi.features.extractor import FeatureSpec
    from simsearch_wsi.features.preprocess import ChannelNormalization
    from simsearch_wsi.infer.dense import ClassMaps

    stride = 16
    geo = PatchGeometry(PATCH_PX, PATCH_PX, stride)
    kh, kw = geo.kernel_hw
    hp, wp = -(-side // stride) - kh + 1, -(-side // stride) - kw + 1
    logits = np.empty((len(CLASSES), hp, wp), dtype=np.float32)
    for c in range(len(CLASSES)):
        z = gaussian_filter(rng.standard_normal((hp, wp)).astype(np.float32), sigma_cells)
        logits[c] = 4.0 * z / z.std()
    logits[-1] += 2.0  # background
    logits -= logits.max(axis=0, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=0, keepdims=True)
    norm = ChannelNormalization((0.0,) * 3, (255.0,) * 3, ("R", "G", "B"), "fixed-range")
    scale = AnalysisScale(0, 1.0, 1.0, 1.0)
    spec = FeatureSpec("resnet18-l3", "random", scale, norm, ("R", "G", "B"), True, 1024, 112)
    return ClassMaps(
        probabilities=p.astype(np.float32),
        classes=CLASSES,
        geometry=geo,
        spec=spec,
        image_size_l0=(side, side),
        analysis_size=(side, side),
    )


def _synthetic_detections(n: int, side: int, rng: np.random.Generator) -> list[Any]:
    from simsearch_wsi.core.geometry import BoxL0
    from simsearch_wsi.infer.dense import Detection

    half = PATCH_PX / 2
    centres = rng.uniform(half, side - half, size=(n, 2))
    logits = rng.standard_normal((n, len(CLASSES))) * 2.0
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    cls = p[:, :-1].argmax(axis=1)
    out = []
    for (cx, cy), k, row in zip(centres.tolist(), cls.tolist(), p.tolist(), strict=True):
        probs = dict(zip(CLASSES, row, strict=True))
        out.append(
            Detection(
                CLASSES[k],
                BoxL0(cx - half, cy - half, PATCH_PX, PATCH_PX),
                probs[CLASSES[k]],
                probs,
            )
        )
    return out


def _tree_mb(path: Path) -> float:
    if path.is_file():
        return round(path.stat().st_size / 2**20, 1)
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def bench_outputs(
    work: Path, *, quick: bool, n_detections: int, dense_mp_s: dict[str, float]
) -> dict[str, Any]:
    """Every writer of ``predict`` on one large slide's results, with peak RSS."""
    from simsearch_wsi.infer.dense import detect, segment
    from simsearch_wsi.infer.predict import (
        _quantify,
        detection_features,
        segmentation_subdivision,
        write_overlay,
    )
    from simsearch_wsi.io.labels import write_label_image
    from simsearch_wsi.qupath.geojson import feature_collection, write_feature_collection
    from simsearch_wsi.qupath.polygons import mask_to_polygons, polygons_to_features

    side = 16_000 if quick else 32_000
    rng = np.random.default_rng(0)
    maps = _synthetic_maps(side, rng, sigma_cells=8.0)
    thresholds = {c: 0.5 for c in CLASSES}
    steps: dict[str, dict[str, Any]] = {}

    found, steps["detect (class-map maxima)"] = _measure(lambda: detect(maps, thresholds))
    steps["detect (class-map maxima)"]["objects"] = len(found)
    del found
    sub = segmentation_subdivision(maps)
    seg, steps["segment (label mask + probabilities)"] = _measure(
        lambda: segment(maps, thresholds, cell_subdivision=sub)
    )
    detections = _synthetic_detections(n_detections, side, rng)
    image = _VirtualSlide(side)

    det_feats, steps["detection_features"] = _measure(
        lambda: detection_features(detections, COLORS)
    )
    steps["detection_features"]["objects"] = len(det_feats)
    regions, steps["mask_to_polygons"] = _measure(
        lambda: mask_to_polygons(
            seg.labels, downsample=seg.downsample, simplify_px=1.0, min_area_um2=0.0, mpp=MPP
        )
    )
    poly_feats, steps["polygons_to_features"] = _measure(
        lambda: polygons_to_features(
            regions, classes=seg.classes, colors=COLORS, object_type="annotation", mpp=MPP
        )
    )
    steps["polygons_to_features"]["objects"] = len(poly_feats)
    steps["polygons_to_features"]["vertices"] = int(
        sum(len(ring) for f in poly_feats for ring in f["geometry"]["coordinates"])
    )
    features = det_feats + poly_feats
    geojson = work / "slide.geojson"
    _, steps["write_feature_collection (GeoJSON)"] = _measure(
        lambda: write_feature_collection(geojson, features)
    )
    steps["write_feature_collection (GeoJSON)"]["file_mb"] = _tree_mb(geojson)
    geojson.unlink()
    store = work / "slide.ome.zarr"
    _, steps["write_label_image (OME-Zarr + probabilities)"] = _measure(
        lambda: write_label_image(
            store,
            seg.labels,
            classes=seg.classes,
            colors=COLORS,
            probabilities=np.fmax(seg.probabilities, 0.0, out=seg.probabilities),  # as predict
            pixel_size_um=(seg.downsample[1] * MPP, seg.downsample[0] * MPP),
            name="simsearch",
            overwrite=True,
        )
    )
    steps["write_label_image (OME-Zarr + probabilities)"]["store_mb"] = _tree_mb(store)
    png = work / "slide_overlay.png"
    _, steps["write_overlay (PNG)"] = _measure(
        lambda: write_overlay(png, image, seg=seg, colors=COLORS, detections=detections)
    )
    counted = Counter(d.class_name for d in detections)
    counts = {c: int(counted.get(c, 0)) for c in seg.classes}
    _, steps["quantification (region stats + DAB)"] = _measure(
        lambda: _quantify(image, seg, None, counts)
    )
    # diagnostic: what the indent costs in json (the pure-Python encoder runs when indent is set)
    doc = feature_collection(features)
    text, indented = _measure(lambda: json.dumps(doc, indent=2, allow_nan=False))
    indented["mb"] = round(len(text) / 2**20, 1)
    text, compact = _measure(lambda: json.dumps(doc, allow_nan=False))
    compact["mb"] = round(len(text) / 2**20, 1)
    del text
    total = sum(s["seconds"] for s in steps.values())
    writers = total - sum(steps[k]["seconds"] for k in list(steps)[:2])
    out: dict[str, Any] = {
        "slide_px": [side, side],
        "segmentation_px": list(seg.labels.shape),
        "segmentation_subdivision": sub,
        "detections": n_detections,
        "steps": steps,
        "writers_s": round(writers, 1),
        "detect_segment_and_writers_s": round(total, 1),
        "json_dumps_indent2": indented,
        "json_dumps_no_indent": compact,
    }
    area = side * side / 1e6
    for label, mp_s in dense_mp_s.items():
        dense_s = area / mp_s
        out[f"dense_{label}_extrapolated"] = {
            "mp_s": round(mp_s, 2),
            "dense_s": round(dense_s, 1),
            "writers_over_dense": round(writers / dense_s, 3),
            "all_after_dense_over_dense": round(total / dense_s, 3),
        }
    return out


def _table(results: dict[str, Any]) -> str:
    lines = []
    d = results.get("dense")
    if d:
        lines += [
            f"dense: {d['image_px']} px slide, {d['tiles_embedded']} tiles, {d['embedded_mp']} MP",
            "| precision | bare trunk MP/s | read + trunk MP/s | dense_class_maps MP/s "
            "| dense / bare | dense / read+trunk | foreground + tile grid s |",
            "|---|---|---|---|---|---|---|",
        ]
        for label in ("fp32", "autocast"):
            if label in d:
                r = d[label]
                lines.append(
                    f"| {label} | {r['bare_trunk_mp_s']} | {r['read_and_trunk_mp_s']} | "
                    f"{r['dense_class_maps_mp_s']} | {r['dense_over_bare']} | "
                    f"{r['dense_over_read_and_trunk']} | {r['detect_foreground_s']} + "
                    f"{r['analysis_tiles_s']} |"
                )
    w = results.get("per_window")
    if w:
        lines += [
            "",
            f"per window ({w['precision']}): {w['sampled_windows']} windows sampled, "
            f"{w['crop_px']}-px crops, {w['per_window_ms']} ms/window "
            f"({w['model_only_ms']} ms model only); dense {w['dense_class_maps_s']} s",
            "| window stride | windows | per-window s (extrapolated) | dense speed-up "
            "| vs model only |",
            "|---|---|---|---|---|",
        ]
        for key in ("feature_stride", "paper_stride"):
            r = w[key]
            lines.append(
                f"| {r['stride_px']} px | {r['windows']:,} | {r['per_window_s_extrapolated']} | "
                f"{r['dense_speedup']}x | {r['dense_speedup_vs_model_only']}x |"
            )
    o = results.get("outputs")
    if o:
        lines += [
            "",
            f"outputs: {o['slide_px']} px slide, {o['segmentation_px']} mask, "
            f"{o['detections']:,} detections",
            "| step | seconds | peak RSS above start (MB) | notes |",
            "|---|---|---|---|",
        ]
        for name, s in o["steps"].items():
            notes = ", ".join(
                f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                for k, v in s.items()
                if k not in ("seconds", "peak_rss_above_start_mb")
            )
            lines.append(f"| {name} | {s['seconds']} | {s['peak_rss_above_start_mb']} | {notes} |")
        lines.append(
            f"writers {o['writers_s']} s; detect + segment + writers "
            f"{o['detect_segment_and_writers_s']} s; json.dumps of the GeoJSON: indent=2 "
            f"{o['json_dumps_indent2']['seconds']} s ({o['json_dumps_indent2']['mb']} MB) vs "
            f"no indent {o['json_dumps_no_indent']['seconds']} s "
            f"({o['json_dumps_no_indent']['mb']} MB)"
        )
        for key, r in o.items():
            if key.startswith("dense_") and isinstance(r, dict):
                lines.append(
                    f"{key}: {r['mp_s']} MP/s -> {r['dense_s']} s; writers / dense "
                    f"{r['writers_over_dense']}, all after dense / dense "
                    f"{r['all_after_dense_over_dense']}"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision",
        choices=["both", "bf16", "fp32"],
        default="both",
        help="dense part: fp32 and/or autocast (bf16 on CPU, fp16 on CUDA); per_window and the "
        "outputs' comparison use autocast unless fp32 only",
    )
    parser.add_argument(
        "--only", nargs="*", default=None, choices=["dense", "per_window", "outputs"]
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (min kept)")
    parser.add_argument("--windows", type=int, default=512, help="per_window sample size")
    parser.add_argument("--context", type=int, default=32, help="bundle context (analysis px)")
    parser.add_argument("--detections", type=int, default=100_000)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.only or ["dense", "per_window", "outputs"]
    precisions = _precisions(args.precision)
    results: dict[str, Any] = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    results["load_avg_1min_before"] = round(os.getloadavg()[0], 2)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        state: dict[str, Any] | None = None
        if "dense" in parts or "per_window" in parts:
            t0 = time.perf_counter()
            dense, state = bench_dense(
                work,
                args.device,
                precisions,
                quick=args.quick,
                repeats=args.repeats,
                context_a=args.context,
            )
            dense["bench_seconds"] = round(time.perf_counter() - t0, 1)
            dense["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
            results["dense"] = dense
            print(json.dumps({"dense": dense}), flush=True)
        if "per_window" in parts and state is not None:
            t0 = time.perf_counter()
            results["per_window"] = bench_per_window(
                args.device, precisions[-1], state, n_windows=args.windows
            )
            results["per_window"]["bench_seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps({"per_window": results["per_window"]}), flush=True)
        if "outputs" in parts:
            mp_s = {} if state is None else {_label(a): state[f"mp_s_{a}"] for a in precisions}
            state = None
            t0 = time.perf_counter()
            results["outputs"] = bench_outputs(
                work, quick=args.quick, n_detections=args.detections, dense_mp_s=mp_s
            )
            results["outputs"]["bench_seconds"] = round(time.perf_counter() - t0, 1)
            results["outputs"]["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
            print(json.dumps({"outputs": results["outputs"]}), flush=True)
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    results["peak_rss_mb_this_process"] = round(
        max(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            _PROCESS_PEAK_MB[0],
            _rss_mb("VmHWM") or 0.0,
        )
    )
    print(json.dumps(results, indent=2))
    print()
    print(_table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
