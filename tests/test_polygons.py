"""Label masks to polygons with holes (exact pixel edges, level-0 frame) and QuPath features."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from numpy.typing import NDArray
from scipy import ndimage
from shapely.geometry import MultiPolygon, Polygon, box

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.qupath.geojson import feature_collection, validate_feature_collection
from simsearch_wsi.qupath.polygons import mask_to_polygons, polygons_to_features


def _pixel_union(mask: NDArray[np.bool_]) -> shapely.Geometry:
    """Reference region: the union of one unit box per pixel (mask coordinates)."""
    i, j = np.nonzero(mask)
    return shapely.union_all(shapely.box(j, i, j + 1, i + 1))


def _smooth_labels(
    shape: tuple[int, int], n_labels: int, sigma: float, seed: int
) -> NDArray[np.int32]:
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    edges = np.quantile(noise, np.linspace(0, 1, n_labels + 1)[1:-1])
    out: NDArray[np.int32] = np.digitize(noise, edges).astype(np.int32)
    return out


def test_square_with_hole_is_one_polygon_with_one_interior_and_exact_area() -> None:
    labels = np.zeros((20, 20), dtype=np.uint8)
    labels[2:18, 3:15] = 1
    labels[6:10, 6:9] = 0
    regions = mask_to_polygons(labels, downsample=(2.0, 3.0), simplify_px=0)
    assert list(regions) == [1]
    region = regions[1]
    assert isinstance(region, MultiPolygon) and region.is_valid
    assert len(region.geoms) == 1
    poly = region.geoms[0]
    assert len(poly.interiors) == 1
    assert poly.area == pytest.approx(int((labels == 1).sum()) * 2.0 * 3.0)
    assert poly.bounds == (3 * 2.0, 2 * 3.0, 15 * 2.0, 18 * 3.0)
    assert Polygon(poly.interiors[0]).bounds == (6 * 2.0, 6 * 3.0, 9 * 2.0, 10 * 3.0)


def test_touching_labels_share_their_boundary_exactly() -> None:
    labels = np.ones((12, 12), dtype=np.int32)
    for i in range(12):  # a staircase boundary between labels 1 and 2
        labels[i, 3 + i // 2 :] = 2
    regions = mask_to_polygons(labels, downsample=(1.0, 1.0), simplify_px=0)
    a, b = regions[1], regions[2]
    assert a.intersection(b).area == 0
    assert a.union(b).area == pytest.approx(a.area + b.area) == 144
    assert a.area == (labels == 1).sum()
    # the shared boundary is a line (not a point or a gap) as long as the staircase
    shared = a.boundary.intersection(b.boundary)
    assert shared.length == pytest.approx(12 + 5)


def test_downsample_and_origin_map_mask_pixels_to_level0() -> None:
    labels = np.zeros((8, 9), dtype=np.int64)
    labels[2:5, 3:7] = 4
    regions = mask_to_polygons(
        labels, downsample=(4.0, 2.0), origin_l0=(100.0, 50.0), simplify_px=0
    )
    region = regions[4]
    assert region.bounds == (100 + 3 * 4, 50 + 2 * 2, 100 + 7 * 4, 50 + 5 * 2)
    assert region.area == pytest.approx(12 * 4.0 * 2.0)
    assert region.equals(box(112, 54, 128, 60))


def test_min_area_drops_small_blobs_and_fills_small_holes() -> None:
    labels = np.zeros((30, 30), dtype=np.int32)
    labels[1:3, 1:3] = 1  # 4 px blob: dropped
    labels[5:25, 5:25] = 1
    labels[8, 8] = 0  # 1 px hole: filled
    labels[12, 12] = 2  # 1 px island of label 2 in a 1 px hole: hole filled, island dropped
    labels[15:20, 15:20] = 0  # 25 px hole: kept
    # mpp 0.5 um/px and downsample 1 -> 0.25 um^2 per pixel; 2 um^2 = 8 px
    regions = mask_to_polygons(
        labels, downsample=(1.0, 1.0), simplify_px=0, min_area_um2=2.0, mpp=0.5
    )
    assert list(regions) == [1]
    region = regions[1]
    assert len(region.geoms) == 1
    assert len(region.geoms[0].interiors) == 1
    assert region.area == 400 - 25
    # without a minimum everything stays
    everything = mask_to_polygons(labels, downsample=(1.0, 1.0), simplify_px=0)
    assert sorted(everything) == [1, 2]
    assert len(everything[1].geoms) == 2
    assert sum(len(p.interiors) for p in everything[1].geoms) == 3


def test_min_area_needs_mpp() -> None:
    labels = np.ones((4, 4), dtype=np.uint8)
    with pytest.raises(ConfigError, match="mpp"):
        mask_to_polygons(labels, downsample=(1.0, 1.0), min_area_um2=5.0)


@pytest.mark.parametrize(
    ("labels", "kwargs", "message"),
    [
        (np.ones((3, 3, 2), dtype=np.uint8), {}, "2-D"),
        (np.ones((3, 3), dtype=np.float32), {}, "integers"),
        (-np.ones((3, 3), dtype=np.int8), {}, ">= 0"),
        (np.ones((3, 3), dtype=np.uint8), {"downsample": (0.0, 1.0)}, "downsample"),
        (np.ones((3, 3), dtype=np.uint8), {"simplify_px": -1.0}, "simplify_px"),
        (np.ones((3, 3), dtype=np.uint8), {"min_area_um2": -1.0, "mpp": 0.5}, "min_area"),
    ],
)
def test_bad_input_raises_config_error(
    labels: NDArray[np.generic], kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"downsample": (1.0, 1.0), **kwargs}
    with pytest.raises(ConfigError, match=message):
        mask_to_polygons(labels, **args)  # type: ignore[arg-type]


def test_empty_mask_gives_no_regions() -> None:
    assert mask_to_polygons(np.zeros((5, 7), dtype=np.uint8), downsample=(1.0, 1.0)) == {}


def test_diagonal_pixels_are_separate_polygons_and_self_touching_rings_are_valid() -> None:
    checker = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=np.uint8)
    region = mask_to_polygons(checker, downsample=(1.0, 1.0), simplify_px=0)[1]
    assert region.is_valid and len(region.geoms) == 5 and region.area == 5
    # a ring of pixels closed only through a corner: the enclosed background is not a hole of
    # a 4-connected region, the outline touches itself there and must come out valid
    loop = np.array([[0, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]], dtype=np.uint8)
    region = mask_to_polygons(loop, downsample=(1.0, 1.0), simplify_px=0)[1]
    assert region.is_valid
    assert region.area == loop.sum()
    assert region.symmetric_difference(_pixel_union(loop == 1)).area == 0


def test_random_labels_match_pixel_reference_exactly_and_within_1pct_simplified() -> None:
    labels = _smooth_labels((160, 200), n_labels=4, sigma=4.0, seed=3)
    exact = mask_to_polygons(labels, downsample=(1.0, 1.0), simplify_px=0)
    simplified = mask_to_polygons(labels, downsample=(1.0, 1.0), simplify_px=0.5)
    assert sorted(exact) == sorted(simplified) == [1, 2, 3]
    for k in (1, 2, 3):
        mask = labels == k
        n_px = int(mask.sum())
        assert exact[k].is_valid and simplified[k].is_valid
        assert exact[k].area == n_px
        assert exact[k].symmetric_difference(_pixel_union(mask)).area == 0
        _, n_components = ndimage.label(mask)  # 4-connected
        assert len(exact[k].geoms) == len(simplified[k].geoms) == n_components
        assert abs(simplified[k].area - n_px) <= 0.01 * n_px
    # labels tile the non-zero pixels without overlaps
    union = shapely.union_all(list(exact.values()))
    assert union.area == pytest.approx(int((labels > 0).sum()))


def test_simplification_keeps_same_label_polygons_apart() -> None:
    rng = np.random.default_rng(7)
    labels = (rng.random((60, 60)) < 0.45).astype(np.uint8)  # many corner contacts
    exact = mask_to_polygons(labels, downsample=(1.0, 1.0), simplify_px=0)[1]
    for tolerance in (0.5, 1.0, 2.0):
        region = mask_to_polygons(labels, downsample=(1.0, 1.0), simplify_px=tolerance)[1]
        assert region.is_valid
        assert len(region.geoms) == len(exact.geoms)
        holes = [len(p.interiors) for p in region.geoms]
        assert holes == [len(p.interiors) for p in exact.geoms]


def test_features_validate_and_carry_classes_colours_and_areas() -> None:
    labels = np.zeros((40, 50), dtype=np.uint8)
    labels[2:12, 2:20] = 1
    labels[20:30, 5:15] = 1
    labels[18:38, 25:45] = 2
    labels[25:30, 30:35] = 0
    ds = 4.0
    regions = mask_to_polygons(labels, downsample=(ds, ds), simplify_px=0)
    colors = {"Tumor": (200, 0, 0), "Stroma": (0, 150, 0)}
    feats = polygons_to_features(
        regions,
        classes=["Tumor", "Stroma"],
        colors=colors,
        measurements={2: {"mean_prob": 0.75}},
        mpp=0.5,
    )
    validate_feature_collection(feature_collection(feats), image_size_l0=(50 * 4, 40 * 4))
    assert len(feats) == 3
    assert len({f["id"] for f in feats}) == 3
    by_class: dict[str, list[dict[str, float]]] = {}
    for f in feats:
        props = f["properties"]
        assert props["objectType"] == "annotation"
        name = props["classification"]["name"]
        assert props["classification"]["color"] == list(colors[name])
        by_class.setdefault(name, []).append(props["measurements"])
    assert sorted(m["area_px"] for m in by_class["Tumor"]) == [100 * ds * ds, 180 * ds * ds]
    (stroma,) = by_class["Stroma"]
    assert stroma["area_px"] == (400 - 25) * ds * ds
    assert stroma["area_um2"] == pytest.approx(stroma["area_px"] * 0.25)
    assert stroma["mean_prob"] == 0.75
    assert feats[2]["geometry"]["type"] == "Polygon"
    assert len(feats[2]["geometry"]["coordinates"]) == 2  # shell + hole


def test_features_without_mpp_and_as_detections() -> None:
    labels = np.zeros((10, 10), dtype=np.uint8)
    labels[1:4, 1:4] = 3
    regions = mask_to_polygons(labels, downsample=(1.0, 1.0))
    feats = polygons_to_features(
        regions, classes=["a", "b", "c"], colors={}, object_type="detection"
    )
    validate_feature_collection(feature_collection(feats))
    (props,) = [f["properties"] for f in feats]
    assert props["objectType"] == "detection"
    assert props["classification"]["name"] == "c"
    assert len(props["classification"]["color"]) == 3  # class_color fallback
    assert set(props["measurements"]) == {"area_px"}


def test_features_reject_labels_without_a_class() -> None:
    labels = np.zeros((6, 6), dtype=np.uint8)
    labels[1:3, 1:3] = 2
    regions = mask_to_polygons(labels, downsample=(1.0, 1.0))
    with pytest.raises(ConfigError, match="label 2 has no class"):
        polygons_to_features(regions, classes=["only"], colors={})
    with pytest.raises(ConfigError, match="object_type"):
        polygons_to_features(regions, classes=["a", "b"], colors={}, object_type="Annotation")


def test_clip_to_image_cuts_what_reaches_past_the_edge() -> None:
    from simsearch_wsi.qupath.polygons import clip_to_image

    labels = np.zeros((4, 4), dtype=np.uint8)
    labels[:, 2:] = 1  # its last column reaches x = 16 at 4 px per mask pixel
    labels[0, 0] = 2  # inside
    regions = mask_to_polygons(labels, downsample=(4.0, 4.0), simplify_px=0)
    clipped = clip_to_image(regions, 14, 16)
    assert clipped[1].bounds == (8.0, 0.0, 14.0, 16.0) and clipped[1].area == 6 * 16
    assert clipped[2].equals(regions[2])
    assert 1 not in clip_to_image({1: regions[1]}, 6, 16)  # nothing left inside
