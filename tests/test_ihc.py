"""IHC cell detection and scoring (infer/cells.py, infer/ihc.py) on synthetic cells with known
per-cell DAB, and the QuPath GeoJSON round trip of their measurements."""

from __future__ import annotations

import json

import numpy as np
import pytest
from shapely.geometry import box

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.infer.cells import (
    QUPATH_H_DAB,
    CellDetectionParams,
    StainVectors,
    _measure_tile,
    detect_cells,
    detect_cells_rgb,
    estimate_stains,
    stain_od,
    working_scale,
)
from simsearch_wsi.infer.ihc import (
    PositivityRule,
    Region,
    cell_features,
    intensity_bins,
    quantify_image,
    region_features,
    score_bins,
    score_regions,
    score_rows,
)
from simsearch_wsi.infer.quantify import write_table
from simsearch_wsi.io import ArraySource
from simsearch_wsi.qupath.geojson import (
    geometry_feature,
    read_features,
    validate_feature_collection,
    write_feature_collection,
)
from simsearch_wsi.synthetic.ihc import DEFAULT_STAINS_RGB, make_ihc_cell_field

MPP = 0.5
# nucleus DAB OD of the four kinds of cells: negative, 1+, 2+, 3+ by QuPath's default
# thresholds 0.2 / 0.4 / 0.6, each well away from a threshold
LEVELS = (0.05, 0.3, 0.5, 0.8)


@pytest.fixture(scope="module")
def field():
    # 7 x 7 = 49 cells, each level 12 or 13 times
    return make_ihc_cell_field((240, 240), dab_levels=LEVELS, seed=3)


def _match(cells, field):
    d = np.hypot(
        cells.x_l0[:, None] - field.centers_xy[None, :, 0],
        cells.y_l0[:, None] - field.centers_xy[None, :, 1],
    )
    return d.argmin(axis=1), d.min(axis=1)


def test_default_stains_are_qupaths() -> None:
    for got, want in zip(
        (QUPATH_H_DAB.hematoxylin, QUPATH_H_DAB.dab), DEFAULT_STAINS_RGB, strict=True
    ):
        want_n = np.asarray(want) / np.linalg.norm(want)
        np.testing.assert_allclose(got, want_n, atol=1e-9)


def test_stain_od_inverts_beer_lambert() -> None:
    h, d = np.asarray(QUPATH_H_DAB.hematoxylin), np.asarray(QUPATH_H_DAB.dab)
    amounts = np.array([[0.0, 0.0], [0.5, 0.0], [0.0, 0.4], [0.3, 0.7]])
    rgb = np.rint(255 * 10 ** -(amounts[:, :1] * h + amounts[:, 1:] * d)).astype(np.uint8)
    od = stain_od(rgb.reshape(1, -1, 3))[0]
    np.testing.assert_allclose(od, amounts, atol=0.01)


def test_estimate_stains_recovers_the_vectors(field) -> None:
    est = estimate_stains(field.rgb)
    assert np.dot(est.hematoxylin, QUPATH_H_DAB.hematoxylin) > 0.995
    assert np.dot(est.dab, QUPATH_H_DAB.dab) > 0.995
    with pytest.raises(ConfigError, match="stained pixels"):
        estimate_stains(np.full((32, 32, 3), 250, np.uint8))


def test_cells_found_and_measured(field) -> None:
    # 1 um = 2 px of expansion stays inside every synthetic cytoplasm ring (>= 2.25 px wide)
    params = CellDetectionParams(cell_expansion_um=1.0)
    cells = detect_cells_rgb(field.rgb, mpp=MPP, params=params)
    n = len(field.centers_xy)
    assert len(cells) == n
    idx, dist = _match(cells, field)
    assert sorted(idx.tolist()) == list(range(n))  # one detection per cell
    # same pixel convention in the synthetic field and the detector: no half-pixel offset
    assert dist.max() < 0.25
    np.testing.assert_allclose(
        cells.measurements["Nucleus: DAB OD mean"], field.nucleus_dab_od[idx], atol=0.01
    )
    np.testing.assert_allclose(
        cells.measurements["Nucleus: Hematoxylin OD mean"], field.hematoxylin_od[idx], atol=0.01
    )
    np.testing.assert_allclose(
        cells.measurements["Cytoplasm: DAB OD mean"], field.cytoplasm_dab_od[idx], atol=0.04
    )
    true_area = np.pi * field.nucleus_radius_px[idx] ** 2 * MPP**2
    # smoothing trims a few edge pixels of a ~100 px nucleus: the worst of the 49 is -12.6 %
    # (88 px found of 96 rasterised), the median within a few %
    area = cells.measurements["Nucleus: Area µm^2"]
    np.testing.assert_allclose(area, true_area, rtol=0.14)
    assert abs(float(np.median(area / true_area)) - 1.0) < 0.04
    assert (cells.measurements["Cell: Area µm^2"] > 1.4 * true_area).all()
    dab_max = cells.measurements["Cell: DAB OD max"]
    np.testing.assert_allclose(dab_max, field.nucleus_dab_od[idx], atol=0.03)


@pytest.mark.parametrize("single", [True, False])
def test_positive_pct_and_h_score_match_the_truth(field, single) -> None:
    cells = detect_cells_rgb(field.rgb, mpp=MPP)
    rule = PositivityRule(single_threshold=single)
    scores, bins = score_regions(cells, [Region("Image", area_um2=1e4)], rule=rule, mpp=MPP)
    truth = intensity_bins(field.nucleus_dab_od, (0.2, 0.4, 0.6))
    pct = 100 * np.bincount(truth, minlength=4) / truth.size
    s = scores[0]
    assert s.n_cells == truth.size
    assert s.positive_pct == pytest.approx(pct[1:].sum(), abs=1e-9)
    assert s.h_score == pytest.approx(pct[1] + 2 * pct[2] + 3 * pct[3], abs=1e-9)
    assert (s.n_1plus, s.n_2plus, s.n_3plus) == tuple(np.bincount(truth, minlength=4)[1:])
    assert s.cells_per_mm2 == pytest.approx(truth.size / 1e-2)
    names = set(rule.class_names(bins))
    assert names == ({"Positive", "Negative"} if single else {"Negative", "1+", "2+", "3+"})


def test_score_bins_by_hand() -> None:
    # 10 cells: 4 negative, 3 x 1+, 2 x 2+, 1 x 3+ -> 60 % positive, H = 30 + 40 + 30 = 100
    s = score_bins(np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 3]), area_um2=2e6)
    assert (s.n_cells, s.n_negative, s.n_positive) == (10, 4, 6)
    assert s.positive_pct == pytest.approx(60.0)
    assert s.h_score == pytest.approx(100.0)
    assert s.cells_per_mm2 == pytest.approx(5.0)
    assert s.positive_per_mm2 == pytest.approx(3.0)
    empty = score_bins(np.zeros(0, np.int8))
    assert empty.n_cells == 0 and empty.positive_pct is None and empty.h_score is None


def test_thresholds_are_inclusive_and_checked() -> None:
    np.testing.assert_array_equal(
        intensity_bins(np.array([0.19, 0.2, 0.4, 0.6, np.nan]), (0.2, 0.4, 0.6)), [0, 1, 2, 3, 0]
    )
    with pytest.raises(ConfigError, match="non-decreasing"):
        PositivityRule(thresholds=(0.4, 0.2, 0.6))
    assert PositivityRule(thresholds=(0.2, 0.2, 0.6)).thresholds == (0.2, 0.2, 0.6)
    # a wrong compartment is refused when the rule is made, before any detection
    with pytest.raises(ConfigError, match="compartment 'Nucleus: GFP mean'"):
        PositivityRule(compartment="Nucleus: GFP mean")
    PositivityRule(compartment="Cytoplasm: DAB OD mean")


def test_working_scale_within_ten_percent_of_the_request() -> None:
    # a 40x slide (0.2527 um/px) works at 0.505 um/px (2 x 2 blocks), not at full resolution
    assert working_scale(0.2527, [1.0, 4.0, 16.0], 0.5) == (0, 2)
    assert working_scale(0.25, [1.0, 2.0, 4.0], 0.5) == (1, 1)
    assert working_scale(0.2527, [1.0, 4.0, 16.0], 2.0) == (1, 2)  # 2.02 um/px
    assert working_scale(0.5, [1.0], 0.5) == (0, 1)
    # 0.3 um/px: 2 x 2 would be 0.6 (20 % coarser), so 1 x 1 (never coarser beyond 10 %)
    assert working_scale(0.3, [1.0], 0.5) == (0, 1)
    assert working_scale(1.0, [1.0], 0.5) == (0, 1)


def test_uneven_downsample_scales_each_axis(field) -> None:
    od = stain_od(field.rgb, QUPATH_H_DAB)
    kw = {
        "px_um": MPP,
        "params": CellDetectionParams(),
        "core": (0, 0, 240, 240),
        "offset_lvl": (0, 0),
        "with_geometry": True,
    }
    even = _measure_tile(od, downsample=(1.0, 1.0), **kw)
    uneven = _measure_tile(od, downsample=(2.0, 1.0), **kw)
    np.testing.assert_allclose(uneven.x_l0, 2.0 * even.x_l0)
    np.testing.assert_allclose(uneven.y_l0, even.y_l0)
    b_even, b_uneven = np.array(even.cells[0].bounds), np.array(uneven.cells[0].bounds)
    np.testing.assert_allclose(b_uneven[[0, 2]], 2.0 * b_even[[0, 2]], atol=1e-6)
    np.testing.assert_allclose(b_uneven[[1, 3]], b_even[[1, 3]], atol=1e-6)


def test_regions_outside_the_image_are_refused_and_areas_clipped(field) -> None:
    img = ArraySource(field.rgb, mpp=MPP)
    far = read_features([geometry_feature(box(1000, 1000, 1100, 1100), class_name=None)])
    with pytest.raises(ConfigError, match=r"regions\.geojson: none of its 1 regions overlaps"):
        quantify_image(img, annotations=far, regions_source="regions.geojson")
    # half of this region lies past the right edge: its area is the half inside
    half = read_features([geometry_feature(box(120, 0, 360, 240), class_name=None)])
    res = quantify_image(img, annotations=half, with_geometry=False)
    assert res.scores[0].area_um2 == pytest.approx(120 * 240 * MPP**2)


def test_single_threshold_annotations_leave_out_bins(field) -> None:
    img = ArraySource(field.rgb, mpp=MPP)
    res = quantify_image(img, with_geometry=False)
    (feat,) = region_features(
        res.regions, res.scores, image_size_l0=img.dimensions, rule=PositivityRule()
    )
    meas = feat["properties"]["measurements"]
    assert "Positive %" in meas and "Num Positive" in meas
    assert not {"H-score", "Num 1+", "Num 2+", "Num 3+"} & set(meas)
    three = PositivityRule(single_threshold=False)
    (feat3,) = region_features(res.regions, res.scores, image_size_l0=img.dimensions, rule=three)
    assert {"H-score", "Num 1+"} <= set(feat3["properties"]["measurements"])


def test_touching_nuclei_are_split() -> None:
    h = np.asarray(QUPATH_H_DAB.hematoxylin)
    yy, xx = np.mgrid[0:64, 0:64]
    nuc = ((xx - 24) ** 2 + (yy - 32) ** 2 <= 64) | ((xx - 38) ** 2 + (yy - 32) ** 2 <= 64)
    od = 0.5 * nuc[..., None] * h
    rgb = np.rint(255 * 10**-od).astype(np.uint8)
    assert len(detect_cells_rgb(rgb, mpp=MPP)) == 2
    params = CellDetectionParams(split=False)
    assert len(detect_cells_rgb(rgb, mpp=MPP, params=params)) == 1


def test_tiles_find_each_cell_once(field) -> None:
    whole = detect_cells_rgb(field.rgb, mpp=MPP)
    img = ArraySource(field.rgb, mpp=MPP)
    tiled = detect_cells(img, tile_px=128, with_geometry=False)
    assert len(tiled) == len(whole)
    order_w = np.lexsort((whole.x_l0, whole.y_l0))
    order_t = np.lexsort((tiled.x_l0, tiled.y_l0))
    np.testing.assert_allclose(tiled.x_l0[order_t], whole.x_l0[order_w], atol=1e-6)
    np.testing.assert_allclose(
        tiled.measurements["Nucleus: DAB OD mean"][order_t],
        whole.measurements["Nucleus: DAB OD mean"][order_w],
        atol=1e-6,
    )


@pytest.mark.parametrize("n_levels", [2, 1])
def test_pyramid_level_follows_requested_pixel_size(n_levels: int) -> None:
    # level 0 at 0.25 um/px: cells twice as many pixels across; detection runs on level 1, or
    # on level 0 averaged in 2 x 2 blocks when there is no level 1
    big = make_ihc_cell_field(
        (256, 256), dab_levels=LEVELS, seed=4, pitch_px=64.0, nucleus_radius_px=(9.0, 12.0)
    )
    img = ArraySource(big.rgb, mpp=0.25, n_levels=n_levels)
    cells = detect_cells(img, with_geometry=True, tile_px=128)
    assert (cells.level, cells.px_um) == (n_levels - 1, pytest.approx(0.5))
    assert len(cells) == len(big.centers_xy)
    d = np.hypot(
        cells.x_l0[:, None] - big.centers_xy[:, 0], cells.y_l0[:, None] - big.centers_xy[:, 1]
    )
    assert d.min(axis=1).max() < 2.0  # level-0 coordinates
    assert cells.nuclei[0].area * 0.25**2 == pytest.approx(
        cells.measurements["Nucleus: Area µm^2"][0], rel=0.15
    )


def test_detect_cells_needs_pixel_size_and_rgb(field) -> None:
    with pytest.raises(ConfigError, match="pixel size"):
        detect_cells(ArraySource(field.rgb))
    with pytest.raises(ConfigError, match="RGB"):
        detect_cells(ArraySource(field.rgb[..., 0], mpp=MPP))
    with pytest.raises(ConfigError, match="hematoxylin"):
        CellDetectionParams(detection_image="eosin")
    with pytest.raises(ConfigError, match="parallel"):
        StainVectors(hematoxylin=(1, 1, 1), dab=(2, 2, 2))


def test_regions_from_qupath_annotations_round_trip(field, tmp_path) -> None:
    img = ArraySource(field.rgb, mpp=MPP)
    left, right = box(0, 0, 120, 240), box(120, 0, 240, 240)
    anns = read_features(
        {
            "type": "FeatureCollection",
            "features": [
                geometry_feature(left, class_name="Tumor", name="left"),
                geometry_feature(right, class_name="Stroma", name="right"),
            ],
        }
    )
    res = quantify_image(img, annotations=anns)
    assert [s.region for s in res.scores] == ["left", "right"]
    assert len(res.cells) == len(field.centers_xy)
    only_left = quantify_image(img, annotations=anns[:1], with_geometry=False)
    assert (only_left.cells.x_l0 < 120).all()  # cells outside every region are dropped
    assert len(only_left.cells) == only_left.scores[0].n_cells
    x = field.centers_xy[:, 0]
    truth = intensity_bins(field.nucleus_dab_od, (0.2, 0.4, 0.6))
    for s, inside in zip(res.scores, (x < 120, x >= 120), strict=True):
        assert s.n_cells == int(inside.sum())
        assert s.n_positive == int((truth[inside] > 0).sum())
        assert s.area_um2 == pytest.approx(120 * 240 * MPP**2)

    feats = cell_features(res.cells, res.bins, rule=PositivityRule(single_threshold=False))
    feats += region_features(res.regions, res.scores, image_size_l0=img.dimensions)
    path = write_feature_collection(tmp_path / "cells.geojson", feats)
    validate_feature_collection(path, image_size_l0=img.dimensions)
    back = read_features(path)
    cells_back = [a for a in back if a.object_type == "cell"]
    ann_back = [a for a in back if a.object_type == "annotation"]
    assert len(cells_back) == len(res.cells)
    m = cells_back[0].measurements
    for name in (
        "Nucleus: DAB OD mean",
        "Nucleus: DAB OD max",
        "Cell: DAB OD max",
        "Cell: DAB OD mean",
        "Nucleus: Area µm^2",
        "Cytoplasm: DAB OD mean",
    ):
        assert name in m
    assert {a.class_name for a in cells_back} == {"Negative", "1+", "2+", "3+"}
    raw_feats = json.loads(path.read_text(encoding="utf-8"))["features"]
    # QuPath reads the nucleus at the Feature's top level, beside "geometry"
    assert raw_feats[0]["nucleusGeometry"]["type"] == "Polygon"
    assert "nucleusGeometry" not in raw_feats[0]["properties"]
    left_back = ann_back[0].measurements
    assert left_back["Num Detections"] == res.scores[0].n_cells
    assert left_back["Positive %"] == pytest.approx(res.scores[0].positive_pct, abs=1e-9)
    assert left_back["H-score"] == pytest.approx(res.scores[0].h_score, abs=1e-9)
    assert {"Num Positive", "Num Negative", "Num 1+", "Num 2+", "Num 3+"} <= set(left_back)
    # each cell outline holds its nucleus
    for a, raw in zip(cells_back[:5], raw_feats[:5], strict=True):
        nuc = raw["nucleusGeometry"]
        assert a.geometry.buffer(0.01).contains(
            read_features({"type": "Feature", "geometry": nuc, "properties": {}})[0].geometry
        )

    table = write_table(tmp_path / "scores.csv", score_rows("synthetic", res.scores))
    header = table.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header[:3] == ["image", "region", "region_class"]
    assert "positive_pct" in header and "h_score" in header


def test_tma_cores_are_regions_and_detections_are_not(field) -> None:
    img = ArraySource(field.rgb, mpp=MPP)
    core = geometry_feature(box(0, 0, 240, 120), class_name=None, name="A-1")
    core["properties"]["objectType"] = "tmaCore"  # as QuPath exports a TMA core
    det = geometry_feature(box(0, 120, 240, 240), class_name="Tumor", object_type="detection")
    res = quantify_image(img, annotations=read_features([core, det]), with_geometry=False)
    (s,) = res.scores
    assert s.region == "A-1" and s.n_cells == int((field.centers_xy[:, 1] < 120).sum())


def test_whole_image_without_annotations_uses_tissue(field) -> None:
    img = ArraySource(field.rgb, mpp=MPP)
    res = quantify_image(img, with_geometry=False, tissue=True)
    (s,) = res.scores
    assert s.region == "Image" and s.n_cells == len(field.centers_xy)
    assert 0 < s.area_um2 <= 240 * 240 * MPP**2
    with pytest.raises(ConfigError, match="no polygonal annotation"):
        quantify_image(img, annotations=[])
