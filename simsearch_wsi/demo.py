"""The embedded demo: generate real and synthetic inputs, run every pipeline step that exists.

Inputs (all generated or shipped, nothing downloaded):

* ``synthetic_he.tiff``: an H&E-like pyramidal TIFF with ring/cluster/stripes motifs, its ground
  truth as QuPath GeoJSON (the classified rectangles a user would draw) and CSV;
* ``skimage_ihc.tiff``: scikit-image's IHC sample (DAB + haematoxylin, real pixels shipped with
  scikit-image) written as a pyramidal TIFF;
* ``synthetic_fluo.ome.tiff``: a DAPI/GFP/Cy5 OME-TIFF;
* ``synthetic_plate.ome.zarr``: a 2 x 3-well OME-Zarr HCS plate, 2 fields per well.

Steps per image: open, tissue/foreground mask, foreground tiles, intensity normalisation and the
inter-channel correlation report; an overview PNG shows the mask and tiles. Then similarity search
on the H&E slide: one prototype per class from the ground-truth GeoJSON (as a user would draw
them), suggestions and background candidates written as QuPath GeoJSON and scored against the
ground truth.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simsearch_wsi.atomic import atomic_path, write_json_atomic
from simsearch_wsi.io import ImageSource, open_image, open_plate
from simsearch_wsi.preprocess import channel_correlation, fit_normalization
from simsearch_wsi.qupath_geojson import read_annotations, write_feature_collection
from simsearch_wsi.search import SimSearch, SuggestResult, prototypes_from_annotations
from simsearch_wsi.synthetic import (
    make_fluorescence_slide,
    make_synthetic_plate,
    make_synthetic_slide,
    write_pyramidal_tiff,
)
from simsearch_wsi.tiling import display_rgb8, foreground_tiles, read_overview
from simsearch_wsi.tissue import TissueMask, detect_foreground

ProgressFn = Callable[[str, int, int], None]

TILE_SIZE = 512
TILE_HALO = 128


@dataclass
class DemoResult:
    """What the demo produced: files by role and one line per finding."""

    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"simsearch-wsi demo: finished in {self.seconds:.1f} s, outputs in {self.out_dir}"]
        lines += [f"  {f}" for f in self.findings]
        lines.append("files:")
        width = max(len(k) for k in self.files) if self.files else 0
        lines += [f"  {k:<{width}}  {v}" for k, v in self.files.items()]
        return "\n".join(lines)


def _overview_png(image: ImageSource, mask: TissueMask, n_tiles: int, path: Path) -> Path:
    """Save an RGB overview with the foreground outline in green and the tile grid in blue."""
    from PIL import Image, ImageDraw
    from skimage.segmentation import find_boundaries

    arr, ds_x, ds_y = read_overview(image, max_pixels=768 * 768, reduce="mean")
    rgb = display_rgb8(arr, brightfield=image.is_brightfield)
    edge = find_boundaries(mask.to_level(rgb.shape[1], rgb.shape[0]), mode="inner")
    rgb[edge] = (0, 200, 0)
    pil = Image.fromarray(rgb)
    draw = ImageDraw.Draw(pil)
    step_x, step_y = TILE_SIZE / ds_x, TILE_SIZE / ds_y
    for gx in np.arange(0, rgb.shape[1], step_x):
        draw.line([(gx, 0), (gx, rgb.shape[0])], fill=(60, 60, 255))
    for gy in np.arange(0, rgb.shape[0], step_y):
        draw.line([(0, gy), (rgb.shape[1], gy)], fill=(60, 60, 255))
    draw.text((4, 4), f"{n_tiles} foreground tiles", fill=(255, 255, 0))
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return path


def _process_image(image: ImageSource, name: str, out_dir: Path, result: DemoResult) -> None:
    mask = detect_foreground(image)
    tiles = foreground_tiles(image, level=0, tile_size=TILE_SIZE, halo=TILE_HALO, mask=mask)
    png = _overview_png(image, mask, len(tiles), out_dir / f"{name}.overview.png")
    norm = fit_normalization([image])
    write_json_atomic(out_dir / f"{name}.normalization.json", norm.to_dict())
    result.files[f"{name} overview"] = png
    w, h = image.dimensions
    mpp = f"{image.mpp:.3g} um/px" if image.mpp else "mpp unknown"
    result.findings.append(
        f"{name}: {image.format} {w}x{h} px, {image.level_count} level(s), {mpp}, "
        f"{image.modality} {image.n_channels}ch; foreground {mask.area_fraction:.0%}, "
        f"{len(tiles)} of {_n_grid(image)} tiles of {TILE_SIZE} px to embed"
    )


def _n_grid(image: ImageSource) -> int:
    w, h = image.dimensions
    return (-(-w // TILE_SIZE)) * (-(-h // TILE_SIZE))


def _score(
    result: SuggestResult, truth: dict[str, list[tuple[float, float]]], radius_l0: float
) -> dict[str, tuple[int, int, int]]:
    """(true positives, suggestions, ground-truth objects) per class; a suggestion is a true
    positive when its centre is within ``radius_l0`` of an unmatched object of its class."""
    out = {}
    for cls, centres in truth.items():
        mine = sorted(
            (s for s in result.suggestions if s.class_name == cls), key=lambda s: -s.similarity
        )
        used: set[int] = set()
        for s in mine:
            cx, cy = s.box.center_l0
            d = [float(np.hypot(cx - x, cy - y)) for x, y in centres]
            k = int(np.argmin(d)) if d else -1
            if k >= 0 and d[k] <= radius_l0 and k not in used:
                used.add(k)
        out[cls] = (len(used), len(mine), len(centres))
    return out


def run_demo(
    out_dir: Path,
    *,
    seed: int = 0,
    search: SimSearch | None = None,
    progress: ProgressFn | None = None,
) -> DemoResult:
    """Generate the embedded inputs under ``out_dir/data`` and run the pipeline on them.

    ``search`` (weights, device and cache chosen by the caller) enables the similarity-search
    step; without it only the I/O, masks, tiles and normalisation steps run.
    """
    from skimage import data as skdata

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out_dir=out_dir)
    steps = ["inputs", "synthetic_he", "skimage_ihc", "synthetic_fluo", "plate", "suggest"]
    report = progress or (lambda stage, done, total: None)

    report("demo", 0, len(steps))
    slide = make_synthetic_slide(data_dir / "synthetic_he.tiff", seed=seed)
    result.files["synthetic H&E slide"] = slide.path
    result.files["its ground truth (QuPath GeoJSON)"] = (
        data_dir / "synthetic_he.ground_truth.geojson"
    )
    slide.to_geojson(result.files["its ground truth (QuPath GeoJSON)"])
    result.files["its ground truth (CSV)"] = slide.to_csv(
        data_dir / "synthetic_he.ground_truth.csv"
    )
    ihc_path = write_pyramidal_tiff(
        data_dir / "skimage_ihc.tiff", skdata.immunohistochemistry(), mpp=None, n_levels=2
    )
    result.files["IHC slide (scikit-image sample)"] = ihc_path
    fluo = make_fluorescence_slide(data_dir / "synthetic_fluo.ome.tiff", seed=seed + 1)
    result.files["fluorescence slide"] = fluo.path
    plate = make_synthetic_plate(data_dir / "synthetic_plate.ome.zarr", seed=seed + 2)
    result.files["HCS plate"] = plate.path
    report("demo", 1, len(steps))

    with open_image(slide.path) as img:
        _process_image(img, "synthetic_he", out_dir, result)
    report("demo", 2, len(steps))
    # The IHC sample has no calibration; 0.5 um/px is stated, not read (scikit-image: 'IHC').
    with open_image(ihc_path, mpp=0.5) as img:
        _process_image(img, "skimage_ihc", out_dir, result)
    report("demo", 3, len(steps))
    with open_image(fluo.path) as img:
        _process_image(img, "synthetic_fluo", out_dir, result)
        corr = channel_correlation([img])
        write_json_atomic(out_dir / "synthetic_fluo.channel_correlation.json", corr.to_dict())
        result.files["channel correlation"] = out_dir / "synthetic_fluo.channel_correlation.json"
        pairs = ", ".join(
            f"{n}={v:.2f}"
            for n, v in zip(corr.channel_names, corr.mean_abs_correlation, strict=True)
        )
        result.findings.append(f"synthetic_fluo: mean |r| with other channels: {pairs}")
    report("demo", 4, len(steps))
    opened = open_plate(plate.path)
    fields = list(opened.fields())
    images = [f.open() for f in fields]
    try:
        norm = fit_normalization(images)
    finally:
        for im in images:
            im.close()
    write_json_atomic(out_dir / "synthetic_plate.normalization.json", norm.to_dict())
    result.files["plate normalisation"] = out_dir / "synthetic_plate.normalization.json"
    ranges = ", ".join(
        f"{n} {lo:.0f}..{hi:.0f}"
        for n, lo, hi in zip(norm.channel_names, norm.low, norm.high, strict=True)
    )
    result.findings.append(
        f"synthetic_plate: {len(opened.wells)} wells x {len(fields) // len(opened.wells)} "
        f"fields; plate-wide intensity range {ranges}"
    )
    report("demo", 5, len(steps))
    if search is not None:
        _demo_suggest(search, slide, data_dir, out_dir, result, progress)
    report("demo", 6, len(steps))
    result.seconds = time.perf_counter() - t0
    write_json_atomic(
        out_dir / "demo_summary.json",
        {
            "findings": result.findings,
            "files": {k: str(v) for k, v in result.files.items()},
            "seconds": round(result.seconds, 2),
        },
    )
    result.files["summary"] = out_dir / "demo_summary.json"
    return result


def _demo_suggest(
    search: SimSearch,
    slide: Any,
    data_dir: Path,
    out_dir: Path,
    result: DemoResult,
    progress: ProgressFn | None,
) -> None:
    """The user's first loop on the H&E slide: one prototype per class -> suggestions."""
    gt_path = data_dir / "synthetic_he.ground_truth.geojson"
    annotations = read_annotations(gt_path)
    firsts: dict[str, Any] = {}
    for a in annotations:
        if a.class_name and a.class_name not in firsts:
            firsts[a.class_name] = a
    proto_path = write_feature_collection(
        data_dir / "synthetic_he.prototypes.geojson",
        [
            {
                "type": "Feature",
                "id": a.id,
                "properties": a.properties,
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [
                        [
                            [a.box.x_l0, a.box.y_l0],
                            [a.box.x1_l0, a.box.y_l0],
                            [a.box.x1_l0, a.box.y1_l0],
                            [a.box.x_l0, a.box.y1_l0],
                            [a.box.x_l0, a.box.y_l0],
                        ]
                    ],
                },
            }
            for a in firsts.values()
        ],
    )
    result.files["prototypes (QuPath GeoJSON)"] = proto_path
    with open_image(slide.path) as img:
        protos = prototypes_from_annotations(list(firsts.values()), img, where=str(proto_path))
        found = search.suggest(img, protos, n_background=5, progress=progress)
    out = write_feature_collection(
        out_dir / "synthetic_he.suggestions.geojson", found.geojson_features()
    )
    result.files["suggestions (QuPath detections)"] = out
    truth = {c: [o.center_l0 for o in slide.objects_of(c)[1:]] for c in slide.classes}
    scores = _score(found, truth, radius_l0=max(p.box.width_l0 for p in protos) / 2)
    parts = ", ".join(
        f"{c} {tp}/{n_truth} found, {tp}/{n} correct" for c, (tp, n, n_truth) in scores.items()
    )
    result.findings.append(
        f"suggest on synthetic_he (1 prototype per class, threshold "
        f"{min(found.thresholds.values()):.2f}): {parts}; embed {found.seconds_embed:.1f} s, "
        f"query {found.seconds_query:.2f} s; weights: {found.weights}"
    )
