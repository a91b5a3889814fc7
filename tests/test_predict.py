"""Inference outputs (issue 6): a fast-preset model on a held-out synthetic slide, every output
file validated, quantification against the ground truth, plates, DAB, resuming."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.eval.thresholded import detection_scores, rasterize_objects, segmentation_iou
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.features.tiling import read_overview
from simsearch_wsi.infer.dense import (
    Detection,
    PatchModel,
    dense_class_maps,
    detect,
    segment,
    untrained_bundle,
)
from simsearch_wsi.infer.predict import (
    PredictSettings,
    PredictTarget,
    detection_features,
    expand_inputs,
    predict_images,
    sample_on_grid,
)
from simsearch_wsi.infer.quantify import dab_od
from simsearch_wsi.io import open_image
from simsearch_wsi.io.labels import validate_label_store
from simsearch_wsi.qupath.geojson import read_features, validate_feature_collection
from simsearch_wsi.review.data import train_session
from simsearch_wsi.review.session import Session
from simsearch_wsi.review.simulate import label_from_truth
from simsearch_wsi.search.engine import SimSearch
from simsearch_wsi.synthetic import make_synthetic_omezarr_slide
from simsearch_wsi.train.bundle import ModelBundle, load_bundle, save_bundle
from simsearch_wsi.train.fit import TrainConfig

MOTIFS = ("ring", "cluster", "stripes")


# --- a model trained with the fast preset (shared by the acceptance tests) -----------------------
@pytest.fixture(scope="module")
def fast_model(tmp_path_factory: pytest.TempPathFactory, small_slides: Any) -> Path:
    """A bundle trained with the ``fast`` preset (random trunk weights, as CI has no ImageNet
    weights) from a simulated user's labels on slide 0; slide 2 is the unreviewed slide."""
    root = tmp_path_factory.mktemp("fast_model")
    session = label_from_truth(Session.create(root / "session"), small_slides[0], background=3)
    trunk, spec, info = build_trunk("resnet18-l3", "random", seed=0)
    search = SimSearch(FeatureExtractor(trunk, spec, info), FeatureCache(root / "cache"))
    # The same threads on every machine: with a few labels and random weights, the reduction
    # order of another thread count is enough to change this model (1 thread: ring F1 0.26
    # on the held-out slide; 2, as on CI, and 4: above 0.6).
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = train_session(
            session,
            search,
            config=TrainConfig.preset_config("fast"),
            open_image=open_image,
            noisy_images=[small_slides[2].path],
            seed=0,
        )
    finally:
        torch.set_num_threads(threads)
    return save_bundle(root / "model.zip", result.bundle)


@pytest.fixture(scope="module")
def predicted(
    tmp_path_factory: pytest.TempPathFactory, fast_model: Path, small_slides: Any
) -> tuple[Path, Any]:
    """``predict`` of the held-out slide 1 with the fast model: (output folder, result)."""
    out = tmp_path_factory.mktemp("predicted")
    model = PatchModel(load_bundle(fast_model))
    (result,) = predict_images(
        expand_inputs([str(small_slides[1].path)]), model, out_dir=out, open_image=open_image
    )
    return out, result


def test_detection_f1_and_segmentation_iou_on_a_held_out_slide(
    fast_model: Path, small_slides: Any
) -> None:
    slide = small_slides[1]
    bundle = load_bundle(fast_model)
    with open_image(slide.path) as image:
        maps = dense_class_maps(image, PatchModel(bundle))
    detections = detect(maps, bundle.thresholds)
    seg = segment(maps, bundle.thresholds)
    # the paper's protocol: a hit is within 3 x its sliding stride (0.1 x patch width) of a centre
    patch_l0 = slide.objects[0].width_l0
    radius_l0 = 3 * 0.1 * bundle.patch_size_l0[0]
    assert radius_l0 < patch_l0 / 2
    scores = detection_scores(detections, slide.objects, classes=MOTIFS, max_distance_l0=radius_l0)
    f1 = {c: s.f1 for c, s in scores.items()}
    truth = rasterize_objects(
        slide.objects, classes=seg.classes, shape=seg.labels.shape, downsample=seg.downsample
    )
    iou = segmentation_iou(seg.labels, truth, classes=seg.classes)
    # measured with bf16 training (a CPU with native bf16): F1 1.0 / 0.92 / 1.0, IoU 0.66 /
    # 0.53 / 0.62 (training seed 1: F1 1.0 / 0.8 / 1.0, IoU 0.7 / 0.54 / 0.74); in fp32 (an
    # AVX2 CPU, simsearch_wsi.features.precision): F1 0.67 / 1.0 / 1.0, the ring's recall whole and
    # its precision halved by false positives (seed 1: 1.0 / 1.0 / 1.0; seed 2: 1.0 / 0.4 /
    # 1.0). One tiny training from random weights varies this much with its seed; the
    # evaluation harness (docs/evaluation.md) measures strategies over repeats instead.
    assert min(f1.values()) >= 0.6, f1
    assert np.mean(list(f1.values())) >= 0.85, f1
    assert all(s.recall >= 5 / 6 for s in scores.values()), scores
    assert min(iou.values()) >= 0.4, iou
    assert np.mean([iou[c] for c in MOTIFS]) >= 0.5, iou


def test_every_output_file_validates(
    predicted: tuple[Path, Any], fast_model: Path, small_slides: Any
) -> None:
    _, result = predicted
    slide = small_slides[1]
    assert set(result.outputs) == {"geojson", "ome_zarr", "overlay", "summary"}
    assert result.stem == "small1"
    # GeoJSON: QuPath dialect, detections with probabilities, segmentation as annotations
    validate_feature_collection(result.outputs["geojson"])
    features = read_features(result.outputs["geojson"])
    detections = [f for f in features if f.object_type == "detection"]
    regions = [f for f in features if f.object_type == "annotation"]
    assert {f.class_name for f in detections} <= set(MOTIFS)
    assert len(detections) == sum(result.n_detections.values())
    search_head = load_bundle(fast_model).head_input == "search"
    for f in detections:
        probs = [f.measurements[f"probability {c}"] for c in (*MOTIFS, "background")]
        assert sum(probs) == pytest.approx(1.0, abs=1e-3)
        assert f.measurements[f"probability {f.class_name}"] == max(probs)
        # the ranking score: the class's log-odds against the background (a search head) or
        # against all other classes (this model's linear head)
        p_c = f.measurements[f"probability {f.class_name}"]
        against = probs[-1] if search_head else 1.0 - p_c
        if against > 1e-3:  # (5 decimals leave too little of a smaller probability)
            assert f.measurements["score"] == pytest.approx(np.log(p_c / against), abs=0.02)
        else:
            assert f.measurements["score"] > np.log(p_c / 1e-3) - 0.02
    assert {f.class_name for f in regions} == set(MOTIFS)
    assert all(f.geometry.is_valid for f in regions)
    # each true motif is covered by a region of its class
    for obj in slide.objects:
        cx, cy = obj.center_l0
        assert any(
            f.class_name == obj.class_name and f.geometry.buffer(4).contains(_point(cx, cy))
            for f in regions
        ), obj
    # OME-Zarr: NGFF validates; labels and probabilities agree; colours are the model's
    store = Path(result.outputs["ome_zarr"])
    validate_label_store(store)
    root = zarr.open_group(store, mode="r")
    probs = np.asarray(root["0"])
    labels = np.asarray(root["labels/simsearch/0"])
    assert probs.shape == (3, *labels.shape)
    on = labels > 0
    assert (probs.argmax(axis=0)[on] + 1 == labels[on]).mean() > 0.99
    colours = root["labels/simsearch"].attrs["image-label"]["colors"]
    model_colours = load_bundle(fast_model).colors
    assert {c["label-value"]: tuple(c["rgba"][:3]) for c in colours} == {
        k: tuple(model_colours[c]) for k, c in enumerate(MOTIFS, start=1)
    }
    # overlay: a thumbnail of the slide's aspect with the class colours in it
    png = np.asarray(Image.open(result.outputs["overlay"]).convert("RGB"))
    assert png.shape[1] / png.shape[0] == pytest.approx(slide.width / slide.height, rel=0.02)
    # run record: settings, model identity and the table rows
    record = json.loads(Path(result.outputs["summary"]).read_text())
    assert record["run"]["settings"]["thresholds"] == {}
    assert record["result"]["rows"] == result.rows


def _point(x: float, y: float) -> Any:
    from shapely.geometry import Point

    return Point(x, y)


def test_quantification_matches_the_ground_truth(
    predicted: tuple[Path, Any], small_slides: Any
) -> None:
    out, result = predicted
    slide = small_slides[1]
    with (out / "quantification.csv").open(newline="") as fh:
        rows = {r["class_name"]: r for r in csv.DictReader(fh)}
    assert set(rows) == set(MOTIFS)
    tissue_um2 = slide.tissue_mask.sum() * slide.mpp**2
    for name in MOTIFS:
        row = rows[name]
        true_objects = slide.objects_of(name)
        true_um2 = sum(o.width_l0 * o.height_l0 for o in true_objects) * slide.mpp**2
        n = int(row["n_detections"])
        assert n == result.n_detections[name]
        # every object found; false positives at most as many as objects (fp32 seed 0: ring 12
        # for 6, see the F1 test above)
        assert len(true_objects) <= n <= 2 * len(true_objects), (name, n)
        # a patch classifier's regions reach about half a patch past an object: within 2.5x of
        # the true box areas (the mask's own area is checked exactly below; measured with seed 0
        # on an AVX512-BF16 CPU after issue 27's fp32 projection head: cluster 2.03x)
        area_um2 = float(row["area_um2"])
        assert 0.5 * true_um2 <= area_um2 <= 2.5 * true_um2, (name, area_um2, true_um2)
        fraction = float(row["fraction_of_foreground"])
        assert 0.5 * true_um2 / tissue_um2 <= fraction <= 2.5 * true_um2 / tissue_um2
        # density is detections per mm^2 of the detected foreground (within 10 % of the truth's)
        assert float(row["density_per_mm2"]) == pytest.approx(n / (tissue_um2 * 1e-6), rel=0.1)
        assert float(row["mean_dab_od"]) >= 0.0  # brightfield: DAB measured
    # areas are the label mask's pixels at the mask's pixel size
    root = zarr.open_group(result.outputs["ome_zarr"], mode="r")
    labels = np.asarray(root["labels/simsearch/0"])
    scale = root.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    for k, name in enumerate(MOTIFS, start=1):
        mask_um2 = np.count_nonzero(labels == k) * scale[-1] * scale[-2]
        assert float(rows[name]["area_um2"]) == pytest.approx(mask_um2, rel=1e-4)


def test_dab_is_the_mean_optical_density_of_each_class_region(
    predicted: tuple[Path, Any], small_slides: Any
) -> None:
    """The DAB column is H-DAB deconvolution averaged over each class's segmented pixels."""
    _, result = predicted
    labels = np.asarray(zarr.open_group(result.outputs["ome_zarr"], mode="r")["labels/simsearch/0"])
    with open_image(small_slides[1].path) as image:
        rgb, ds_x, ds_y = read_overview(image, max_pixels=4_000_000)
    # the mask grid's level-0 pixels per mask pixel, from the store's micrometre scale
    root = zarr.open_group(result.outputs["ome_zarr"], mode="r")
    scale = root.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    mpp = small_slides[1].mpp
    lab = sample_on_grid(
        labels,
        (scale[-1] / mpp, scale[-2] / mpp),
        shape=rgb.shape[:2],
        grid_downsample=(ds_x, ds_y),
    )
    od = dab_od(np.clip(rgb[..., :3], 0, 255).astype(np.uint8))
    for k, row in enumerate(result.rows, start=1):
        assert row["class_name"] == MOTIFS[k - 1]
        assert row["mean_dab_od"] == pytest.approx(float(od[lab == k].mean()), rel=1e-4)


def test_a_rerun_with_the_same_model_and_settings_reuses_the_outputs(
    predicted: tuple[Path, Any], fast_model: Path, small_slides: Any
) -> None:
    out, first = predicted
    model = PatchModel(load_bundle(fast_model))
    targets = expand_inputs([str(small_slides[1].path)])
    stamp = os.stat(first.outputs["geojson"]).st_mtime_ns
    (again,) = predict_images(targets, model, out_dir=out, open_image=open_image)
    assert again.reused and again.rows == first.rows
    assert os.stat(first.outputs["geojson"]).st_mtime_ns == stamp
    # other thresholds: the image is run again, and a threshold of 1 removes the class
    strict = PredictSettings(thresholds={"cluster": 1.0})
    (redo,) = predict_images(targets, model, out_dir=out, open_image=open_image, settings=strict)
    assert not redo.reused
    assert redo.n_detections["cluster"] == 0
    assert {r["class_name"]: r["area_um2"] for r in redo.rows}["cluster"] == 0.0
    assert redo.n_detections["ring"] == first.n_detections["ring"]


# --- untrained bundles: structure of outputs for plates, fluorescence, write-back ---------------
def _untrained_bundle(images: list[Any]) -> ModelBundle:
    return untrained_bundle(
        images, classes=("positive", "negative", "background"), patch_size_l0=32, threshold=0.0
    )


def test_a_plate_gives_one_row_per_well_field_and_class(
    tmp_path: Path, synthetic_plate: Any
) -> None:
    targets = expand_inputs([str(synthetic_plate.path)])
    n_fields = len(synthetic_plate.wells) * synthetic_plate.fields_per_well
    assert len(targets) == n_fields
    assert targets[0].stem == f"{synthetic_plate.path.name.split('.')[0]}_A1_f0"
    images = [open_image(t.path) for t in targets[:2]]
    bundle = _untrained_bundle(images)
    for im in images:
        im.close()
    results = predict_images(
        targets,
        PatchModel(bundle),
        out_dir=tmp_path / "out",
        open_image=open_image,
        settings=PredictSettings(write_overlay=False, write_back=True),
    )
    with (tmp_path / "out" / "quantification.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n_fields * 2  # positive, negative
    assert list(rows[0])[:6] == ["image", "plate", "well", "row", "column", "field"]
    wells = {(r["row"], r["column"]) for r in rows}
    assert wells == {(w.row, w.column) for w in synthetic_plate.wells.values()}
    for r in rows:
        assert r["well"] == r["row"] + r["column"]
        assert r["mean_dab_od"] == ""  # fluorescence: no DAB
    assert {int(r["field"]) for r in rows} == set(range(synthetic_plate.fields_per_well))
    # the labels were also written back into each field of the plate, and validate
    for t, res in zip(targets, results, strict=True):
        assert Path(res.outputs["labels"]) == Path(t.path) / "labels" / "simsearch"
        validate_label_store(t.path)
    with open_image(targets[0].path) as im:
        back = np.asarray(zarr.open_group(targets[0].path, mode="r")["labels/simsearch/0"])
        assert back.shape == (im.dimensions[1], im.dimensions[0])
    # labels written into the inputs do not change their identity: a rerun redoes nothing
    again = predict_images(
        targets,
        PatchModel(bundle),
        out_dir=tmp_path / "out",
        open_image=open_image,
        settings=PredictSettings(write_overlay=False, write_back=True),
    )
    assert [r.reused for r in again] == [True] * n_fields


def test_detection_features_carry_the_ranking_score_when_it_is_finite() -> None:
    """Each GeoJSON detection has its probabilities and its ranking ``score`` (4 decimals); a
    detection without a finite score (``Detection``'s default) has no ``score`` measurement
    rather than a NaN that QuPath and JSON cannot read."""
    probs = {"ring": 0.9, "background": 0.1}
    dets = [
        Detection("ring", BoxL0(10, 20, 30, 30), 0.9, probs, 2.197224577),
        Detection("ring", BoxL0(50, 20, 30, 30), 0.9, probs),  # score NaN
        Detection("ring", BoxL0(90, 20, 30, 30), 0.9, probs, float("inf")),
    ]
    features = detection_features(dets, {"ring": (255, 0, 0)})
    assert len(features) == 3
    measured = [f["properties"]["measurements"] for f in features]
    assert all(
        m["probability ring"] == 0.9 and m["probability background"] == 0.1 for m in measured
    )
    assert measured[0]["score"] == 2.1972
    assert "score" not in measured[1] and "score" not in measured[2]
    json.dumps(features, allow_nan=False)  # valid JSON: no NaN or Infinity anywhere


def test_inputs_with_the_same_stem_are_refused(tmp_path: Path, small_slides: Any) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    copy = other / small_slides[0].path.name
    copy.write_bytes(small_slides[0].path.read_bytes())
    with pytest.raises(ConfigError, match="separate --out folders"):
        expand_inputs([str(small_slides[0].path), str(copy)])


def test_images_the_model_does_not_fit_are_refused(
    tmp_path: Path, small_slides: Any, synthetic_plate: Any
) -> None:
    field = expand_inputs([str(synthetic_plate.path)])[0]
    with open_image(field.path) as im:
        bundle = _untrained_bundle([im])
    target = PredictTarget(str(small_slides[0].path), "small0")
    with pytest.raises(ConfigError, match="channels"):
        predict_images([target], PatchModel(bundle), out_dir=tmp_path, open_image=open_image)
    assert not (tmp_path / "small0.geojson").exists()


def test_outputs_never_replace_an_input(tmp_path: Path, synthetic_plate: Any) -> None:
    """An OME-Zarr input predicted into its own folder would be replaced by its output store,
    and outputs inside a plate would mix with its wells: both refused before anything is
    written."""
    image = make_synthetic_omezarr_slide(
        tmp_path / "x.ome.zarr", width=512, height=384, n_per_class=1, n_levels=1
    )
    with open_image(image.path) as im:
        model = PatchModel(_untrained_bundle([im]))
    targets = expand_inputs([str(image.path)])
    with pytest.raises(ConfigError, match="would replace an input"):
        predict_images(targets, model, out_dir=tmp_path, open_image=open_image)
    well = Path(expand_inputs([str(synthetic_plate.path)])[0].path).parent
    with pytest.raises(ConfigError, match="inside the input"):
        predict_images(
            expand_inputs([str(synthetic_plate.path)]), model, out_dir=well, open_image=open_image
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ome.zarr"]
    assert sorted(p.name for p in well.iterdir() if not p.name.startswith(".")) == ["0", "1"]


def test_image_by_image_runs_build_one_table(
    tmp_path: Path, tiny_bundle: Path, small_slides: Any
) -> None:
    """Runs of one image each into one folder (as the QuPath script does) give a table of all
    images with the same model and settings; rows of other settings are left out."""
    model = PatchModel(load_bundle(tiny_bundle))
    out = tmp_path / "out"
    fast = PredictSettings(write_zarr=False, write_overlay=False)
    for slide in small_slides[:2]:
        predict_images(
            expand_inputs([str(slide.path)]),
            model,
            out_dir=out,
            open_image=open_image,
            settings=fast,
        )
    with (out / "quantification.csv").open(newline="") as fh:
        images = {r["image"] for r in csv.DictReader(fh)}
    assert images == {str(s.path) for s in small_slides[:2]}
    other = PredictSettings(write_zarr=False, write_overlay=False, simplify_px=0.0)
    predict_images(
        expand_inputs([str(small_slides[2].path)]),
        model,
        out_dir=out,
        open_image=open_image,
        settings=other,
    )
    with (out / "quantification.csv").open(newline="") as fh:
        images = {r["image"] for r in csv.DictReader(fh)}
    assert images == {str(small_slides[2].path)}
