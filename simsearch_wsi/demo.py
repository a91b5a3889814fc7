"""The embedded demo (``simsearch-wsi demo``, what ``make demo`` runs): the whole method on
shipped and generated data, nothing downloaded.

Inputs, generated under ``<out>/data``:

* ``synthetic_he/``: three seeded H&E-like pyramidal TIFFs (:func:`~simsearch_wsi.eval.benchmark.
  synthetic_benchmark`): ``review0`` (the slide the user reviews), ``unlabelled0`` (never
  reviewed; self-learning mines it) and ``test0`` (held out, scored), with ring/cluster/stripes
  motifs, look-alike distractors and stain jitter; ground truth as CSV (and QuPath GeoJSON for
  ``review0``);
* ``skimage_ihc.tiff``: scikit-image's IHC sample (real pixels: colonic glands, DAB +
  haematoxylin) as a pyramidal TIFF, its pixel size stated as 0.5 um/px (the sample has none);
* ``synthetic_fluo.ome.tiff`` and ``synthetic_plate.ome.zarr`` (2 x 3 wells, 2 fields each).

Every image is opened, its foreground and tiles found and its intensities normalised (overview
PNGs). Then two human-in-the-loop experiments play the user with the prototypes in the
repository's ``examples/`` folder (QuPath GeoJSON a user can load too):

1. **synthetic H&E**: suggest on ``review0`` -> the simulated user reviews the suggestions
   against the ground truth (approves correct ones, flags wrong ones as negatives, confirms
   background; :mod:`simsearch_wsi.eval.user`) -> train (``quick`` preset, default strategy) ->
   predict on the held-out ``test0`` (QuPath GeoJSON, OME-Zarr labels, quantification CSV,
   overlay PNG), scored by PR-AUC per class against its truth, next to the search alone;
2. **IHC**: the same loop on the real IHC image, the reviewer being a colour rule
   (:mod:`simsearch_wsi.eval.derived`, a pseudo-truth, not expert annotation); the prediction
   is on the same image, so its IoU with the rule is agreement, not a held-out score.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simsearch_wsi.core.atomic import atomic_path, write_json_atomic
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.eval.ablation import score_model, score_search
from simsearch_wsi.eval.benchmark import Benchmark, synthetic_benchmark
from simsearch_wsi.eval.derived import IHC_CLASSES, ihc_pseudo_truth, label_fractions
from simsearch_wsi.eval.metrics import paper_match_radius_l0
from simsearch_wsi.eval.thresholded import segmentation_iou_on_truth
from simsearch_wsi.eval.user import ReviewOutcome, TruthImage, UserConfig, simulate_review
from simsearch_wsi.features.preprocess import channel_correlation, fit_normalization
from simsearch_wsi.features.tiling import display_rgb8, foreground_tiles, read_overview
from simsearch_wsi.features.tissue import TissueMask, detect_foreground
from simsearch_wsi.infer.dense import PatchModel, dense_class_maps, segment
from simsearch_wsi.infer.predict import PredictResult, PredictTarget, predict_images
from simsearch_wsi.io import ImageSource, open_image, open_plate
from simsearch_wsi.io.tiff_writer import write_pyramidal_tiff
from simsearch_wsi.qupath.geojson import box_features, read_annotations, write_feature_collection
from simsearch_wsi.review.data import train_session
from simsearch_wsi.review.session import Session
from simsearch_wsi.search.engine import SimSearch, prototypes_from_annotations
from simsearch_wsi.search.similarity import Prototype
from simsearch_wsi.synthetic import make_fluorescence_slide, make_synthetic_plate
from simsearch_wsi.train.bundle import save_bundle
from simsearch_wsi.train.fit import TrainConfig

ProgressFn = Callable[[str, int, int], None]

TILE_SIZE = 512
TILE_HALO = 128
#: the repository's examples folder (the demo's prototypes); found when run from a clone
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
HE_PROTOTYPES = "synthetic_he.prototypes.geojson"
IHC_PROTOTYPES = "skimage_ihc.prototypes.geojson"
#: the demo's synthetic H&E slides (smaller than the evaluation benchmark's, for time)
HE_SIZE = (1536, 1024)
HE_PER_CLASS = 8
#: the pixel size stated for scikit-image's uncalibrated IHC sample
IHC_MPP = 0.5
#: wrong suggestions the simulated user flags per class (the paper's N)
DEMO_NEGATIVES = 5
#: the training preset (about a minute per model on 2 CPU cores)
DEMO_PRESET = "quick"


@dataclass
class DemoResult:
    """What the demo produced: files by role and one line per finding."""

    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    scores: dict[str, Any] = field(default_factory=dict)
    weights: str = ""
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"simsearch-wsi demo: finished in {self.seconds:.1f} s, outputs in {self.out_dir}"]
        if self.weights:
            lines.append(f"  weights: {self.weights}")
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


def run_demo(
    out_dir: Path,
    *,
    seed: int = 0,
    search: SimSearch | None = None,
    examples_dir: Path = EXAMPLES_DIR,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
) -> DemoResult:
    """Generate the inputs under ``out_dir/data`` and run the pipeline on them (module
    docstring).

    ``search`` (weights, device and cache chosen by the caller) enables the two experiments
    (suggest -> review -> train -> predict, with the prototypes in ``examples_dir``); without
    it only the I/O, masks, tiles and normalisation steps run. ``seed`` seeds the training.
    """
    from skimage import data as skdata

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if search is not None:
        for name in (HE_PROTOTYPES, IHC_PROTOTYPES):
            if not (Path(examples_dir) / name).is_file():
                raise ConfigError(
                    f"{Path(examples_dir) / name}: the demo's prototypes are missing; run the "
                    "demo from a clone of the repository or pass --examples DIR"
                )
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out_dir=out_dir)
    steps = ["inputs", "synthetic_he", "skimage_ihc", "synthetic_fluo", "plate", "H&E", "IHC"]
    report = progress or (lambda stage, done, total: None)

    report("demo", 0, len(steps))
    bench = synthetic_benchmark(
        data_dir / "synthetic_he",
        n_review=1,
        n_unlabelled=1,
        n_test=1,
        size=HE_SIZE,
        n_per_class=HE_PER_CLASS,
    )
    review = bench.review[0]
    result.files["synthetic H&E slides (review, unlabelled, test)"] = review.path.parent
    truth_geojson = review.path.with_name("review0.ground_truth.geojson")
    _write_truth_geojson(review, truth_geojson)
    result.files["review slide ground truth (QuPath GeoJSON)"] = truth_geojson
    rgb = skdata.immunohistochemistry()
    ihc_path = write_pyramidal_tiff(data_dir / "skimage_ihc.tiff", rgb, mpp=None, n_levels=2)
    result.files["IHC slide (scikit-image sample)"] = ihc_path
    fluo = make_fluorescence_slide(data_dir / "synthetic_fluo.ome.tiff", seed=seed + 1)
    result.files["fluorescence slide"] = fluo.path
    plate = make_synthetic_plate(data_dir / "synthetic_plate.ome.zarr", seed=seed + 2)
    result.files["HCS plate"] = plate.path
    report("demo", 1, len(steps))

    with open_image(review.path) as img:
        _process_image(img, "synthetic_he", out_dir, result)
    report("demo", 2, len(steps))
    # The IHC sample has no calibration; 0.5 um/px is stated, not read (scikit-image: 'IHC').
    with open_image(ihc_path, mpp=IHC_MPP) as img:
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
    _process_plate(plate.path, out_dir, result)
    report("demo", 5, len(steps))
    if search is not None:
        result.weights = search.extractor.weights.description
        run = _Run(search, Path(examples_dir), out_dir, result, device, seed, progress)
        _experiment_he(run, bench)
        report("demo", 6, len(steps))
        _experiment_ihc(
            run, TruthImage(ihc_path, ihc_pseudo_truth(rgb, source="IHC colour rule"), IHC_MPP)
        )
    report("demo", len(steps), len(steps))
    result.seconds = time.perf_counter() - t0
    write_json_atomic(
        out_dir / "demo_summary.json",
        {
            "findings": result.findings,
            "weights": result.weights,
            "scores": _json_safe(result.scores),
            "files": {k: str(v) for k, v in result.files.items()},
            "seconds": round(result.seconds, 2),
        },
    )
    result.files["summary"] = out_dir / "demo_summary.json"
    return result


def _json_safe(value: Any) -> Any:
    """NaN (a class without a score) as ``None``, so the summary is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _process_plate(path: Path, out_dir: Path, result: DemoResult) -> None:
    opened = open_plate(path)
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


def _write_truth_geojson(image: TruthImage, path: Path) -> Path:
    """The truth's boxes as classified QuPath annotations (what an expert would have drawn)."""
    names = [c for c in image.truth.classes for _ in range(image.truth.n_objects(c))]
    boxes = np.concatenate([image.truth.boxes(c) for c in image.truth.classes])
    return write_feature_collection(
        path, box_features(boxes, class_names=names, object_type="annotation")
    )


def _read_prototypes(path: Path, image: TruthImage, open_fn: Any) -> list[Prototype]:
    """The rectangles of a QuPath GeoJSON file as prototypes on ``image``."""
    with open_fn(image.path) as img:
        protos = prototypes_from_annotations(read_annotations(path), img, where=str(path))
    return [dataclasses.replace(p, image=image.key) for p in protos]


def _loop(
    run: _Run,
    images: list[TruthImage],
    classes: tuple[str, ...],
    prototypes: list[Prototype],
    *,
    work: Path,
    patch_size_l0: float,
    noisy_images: tuple[Path, ...],
    open_fn: Any,
) -> tuple[ReviewOutcome, PatchModel, Path, list[str]]:
    """suggest -> simulated review -> background -> train; the session and ``model.zip`` go
    to ``work``. Returns the review, the model, the bundle's path and training notes."""
    session_dir = work / "session"
    if session_dir.exists():  # a rerun replays the same review from scratch
        shutil.rmtree(session_dir)
    session = Session.create(session_dir)
    outcome = simulate_review(
        run.search,
        session,
        images=images,
        classes=classes,
        config=UserConfig(
            prototypes_per_class=max(1, len(prototypes) // len(classes)),
            negatives_per_class=DEMO_NEGATIVES,
        ),
        patch_size_l0=patch_size_l0,
        radius_l0=paper_match_radius_l0(patch_size_l0),
        rng=np.random.default_rng(run.seed),
        open_image=open_fn,
        prototypes=prototypes,
        progress=run.progress,
    )
    trained = train_session(
        session,
        run.search,
        config=TrainConfig.preset_config(DEMO_PRESET),
        open_image=open_fn,
        noisy_images=noisy_images,
        device=run.device,
        seed=run.seed,
        progress=run.progress,
    )
    bundle_path = save_bundle(work / "model.zip", trained.bundle)
    model = PatchModel(trained.bundle, device=run.device)
    return outcome, model, bundle_path, list(trained.notes)


def _review_line(outcome: ReviewOutcome) -> str:
    return ", ".join(
        f"{c} {outcome.approved[c]} approved / {outcome.flagged[c]} flagged"
        for c in outcome.approved
    )


def _predict(
    model: PatchModel, path: Path, out: Path, open_fn: Any, progress: ProgressFn | None
) -> PredictResult:
    (result,) = predict_images(
        [PredictTarget(str(path), path.name.split(".")[0])],
        model,
        out_dir=out,
        open_image=open_fn,
        resume=False,
        progress=progress,
    )
    return result


@dataclass(frozen=True)
class _Run:
    """What both experiments share: the engine, where things are, and the run's settings."""

    search: SimSearch
    examples_dir: Path
    out_dir: Path
    result: DemoResult
    device: torch.device | str
    seed: int
    progress: ProgressFn | None


def _experiment_he(run: _Run, bench: Benchmark) -> None:
    """Experiment 1 (module docstring): synthetic H&E, scored on the held-out slide."""
    search, result, progress = run.search, run.result, run.progress
    work = run.out_dir / "synthetic_he"
    review = bench.review[0]
    prototypes = _read_prototypes(run.examples_dir / HE_PROTOTYPES, review, open_image)
    outcome, model, bundle_path, notes = _loop(
        run,
        [review],
        bench.classes,
        prototypes,
        work=work,
        patch_size_l0=bench.patch_size_l0,
        noisy_images=bench.unlabelled,
        open_fn=open_image,
    )
    result.files["H&E session (review decisions)"] = work / "session" / "session.json"
    result.files["H&E model bundle"] = bundle_path
    radius = paper_match_radius_l0(bench.patch_size_l0)
    searched = score_search(
        search,
        bench,
        prototypes=prototypes,
        open_image=open_image,
        radius_l0=radius,
        progress=progress,
    )
    scored = score_model(model, bench, open_image=open_image, radius_l0=radius, progress=progress)
    test = bench.test[0].path
    predicted = _predict(model, test, work / "predictions", open_image, progress)
    _record_outputs(result, "H&E test slide", predicted, work / "predictions")
    aps = {s.class_name: s.ap for s in scored}
    search_aps = {s.class_name: s.ap for s in searched}
    result.scores["synthetic_he"] = {
        "review": outcome.to_dict(),
        "pr_auc_model": aps,
        "pr_auc_search": search_aps,
        "iou_model": {s.class_name: s.iou for s in scored},
        "detections": predicted.n_detections,
        "notes": notes,
    }
    result.findings.append(
        f"synthetic H&E: {len(prototypes)} prototypes from {HE_PROTOTYPES}; simulated review on "
        f"review0: {_review_line(outcome)}"
    )
    result.findings.append(
        "synthetic H&E, held-out test0, PR-AUC (model | search alone): "
        + ", ".join(f"{c} {aps[c]:.2f} | {search_aps[c]:.2f}" for c in bench.classes)
        + f"; mean {np.nanmean(list(aps.values())):.2f} | "
        f"{np.nanmean(list(search_aps.values())):.2f}"
    )
    behind = [c for c in bench.classes if aps[c] < search_aps[c] - 0.005]
    if behind:
        result.findings.append(
            "synthetic H&E: the trained model is below the search alone for "
            + ", ".join(f"{c} ({aps[c]:.2f} < {search_aps[c]:.2f})" for c in behind)
            + f": the {DEMO_PRESET!r} preset trains for about a minute on one reviewed slide, "
            "and it ranks some look-alikes or places some detections off-centre where the "
            "prototypes' cosine does not; for these classes use the search's suggestions, or "
            "review more suggestions and train with a longer preset (docs/evaluation.md, "
            "'Training study')"
        )


def _experiment_ihc(run: _Run, ihc: TruthImage) -> None:
    """Experiment 2 (module docstring): real IHC pixels, reviewed by the colour rule."""
    result, progress = run.result, run.progress
    work = run.out_dir / "skimage_ihc"
    open_fn = partial(open_image, mpp=IHC_MPP)
    prototypes = _read_prototypes(run.examples_dir / IHC_PROTOTYPES, ihc, open_fn)
    size = float(np.median([p.box.width_l0 for p in prototypes]))
    outcome, model, bundle_path, notes = _loop(
        run,
        [ihc],
        IHC_CLASSES,
        prototypes,
        work=work,
        patch_size_l0=size,
        noisy_images=(),
        open_fn=open_fn,
    )
    result.files["IHC session (review decisions)"] = work / "session" / "session.json"
    result.files["IHC model bundle"] = bundle_path
    predicted = _predict(model, ihc.path, work / "predictions", open_fn, progress)
    _record_outputs(result, "IHC", predicted, work / "predictions")
    with open_fn(ihc.path) as img:
        maps = dense_class_maps(img, model, progress=progress)
    seg = segment(maps, model.bundle.thresholds)
    iou = segmentation_iou_on_truth(
        seg.labels, classes=seg.classes, downsample=seg.downsample, truth=ihc.truth
    )
    rule = label_fractions(ihc.truth)
    result.scores["skimage_ihc"] = {
        "review": outcome.to_dict(),
        "iou_with_colour_rule": iou,
        "rule_fractions": rule,
        "notes": notes,
    }
    result.findings.append(
        "IHC (real pixels; reviewer = colour rule, a pseudo-truth: "
        + ", ".join(f"{c} {f:.0%} of the image" for c, f in rule.items())
        + f"): {len(prototypes)} prototypes from {IHC_PROTOTYPES}; {_review_line(outcome)}"
    )
    result.findings.append(
        "IHC segmentation vs the colour rule on the same image (agreement, not held out), IoU: "
        + ", ".join(f"{c} {v:.2f}" for c, v in iou.items())
    )


def _record_outputs(result: DemoResult, what: str, predicted: PredictResult, folder: Path) -> None:
    names = {
        "geojson": "QuPath GeoJSON",
        "ome_zarr": "OME-Zarr labels",
        "overlay": "overlay PNG",
    }
    for key, label in names.items():
        if key in predicted.outputs:
            result.files[f"{what} {label}"] = Path(predicted.outputs[key])
    result.files[f"{what} quantification CSV"] = folder / "quantification.csv"
