"""Ground-truth readers (simsearch_wsi.eval.truth): CSV, QuPath GeoJSON, label masks, synthetic."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import MultiPoint, Point, Polygon

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.eval import (
    GroundTruth,
    read_truth,
    read_truth_csv,
    read_truth_geojson,
    read_truth_mask,
    truth_from_label_array,
    truth_from_synthetic,
)
from simsearch_wsi.qupath.geojson import box_feature, geometry_feature, write_feature_collection

NAN4 = [math.nan] * 4


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- GroundTruth itself -----------------------------------------------------------------------
def test_ground_truth_queries_and_subset() -> None:
    truth = GroundTruth.from_centres(
        {"ring": [[1.0, 2.0], [3.0, 4.0]], "cluster": [[5.0, 6.0]]},
        boxes_l0={"ring": [[0.0, 1.0, 2.0, 2.0], NAN4]},
        classes=["ring", "cluster", "stripes"],
        source="t",
    )
    assert truth.classes == ("ring", "cluster", "stripes")
    assert truth.counts() == {"ring": 2, "cluster": 1, "stripes": 0}
    assert truth.n_objects() == 3 and truth.n_objects("ring") == 2
    assert truth.n_objects("unknown") == 0 and truth.centres("unknown").shape == (0, 2)
    np.testing.assert_array_equal(truth.boxes("ring")[0], [0.0, 1.0, 2.0, 2.0])
    assert np.isnan(truth.boxes("ring")[1]).all() and np.isnan(truth.boxes("cluster")).all()
    assert truth.centres("stripes").shape == (0, 2) and truth.boxes("stripes").shape == (0, 4)
    with pytest.raises(ValueError, match="read-only"):
        truth.centres("ring")[0, 0] = 9.0
    assert repr(truth) == "GroundTruth(ring=2, cluster=1, stripes=0; mask=None, source='t')"

    sub = truth.subset(["cluster", "nuclear_gfp"])
    assert sub.classes == ("cluster", "nuclear_gfp")
    assert sub.counts() == {"cluster": 1, "nuclear_gfp": 0}
    np.testing.assert_array_equal(sub.centres("cluster"), [[5.0, 6.0]])


def test_ground_truth_validation() -> None:
    with pytest.raises(ConfigError, match="repeat"):
        GroundTruth(("a", "a"), {"a": np.zeros((0, 2))}, {"a": np.zeros((0, 4))})
    with pytest.raises(ConfigError, match="one array per class"):
        GroundTruth(("a",), {"b": np.zeros((0, 2))}, {"a": np.zeros((0, 4))})
    with pytest.raises(ConfigError, match=r"must be \(1, 4\)"):
        GroundTruth(("a",), {"a": np.zeros((1, 2))}, {"a": np.zeros((2, 4))})
    with pytest.raises(ConfigError, match="non-finite"):
        GroundTruth.from_centres({"a": [[math.nan, 0.0]]})
    with pytest.raises(ConfigError, match="not in classes"):
        GroundTruth.from_centres({"a": [[0.0, 0.0]]}, classes=["b"])
    with pytest.raises(ConfigError, match=r"labels range 0\.\.2"):
        GroundTruth((), {}, {}, mask=np.array([[0, 2]]), mask_classes=("a",))
    with pytest.raises(ConfigError, match="mask_downsample"):
        GroundTruth(
            (), {}, {}, mask=np.zeros((2, 2), int), mask_classes=("a",), mask_downsample=(0.0, 1.0)
        )


# --- CSV ----------------------------------------------------------------------------------
def test_csv_points(tmp_path: Path) -> None:
    p = write(tmp_path / "pts.csv", "class,x,y\nring,10,20\ncluster,5.5,6\nring,30,40.25\n")
    truth = read_truth_csv(p)
    assert truth.classes == ("ring", "cluster")  # order of first appearance
    np.testing.assert_array_equal(truth.centres("ring"), [[10, 20], [30, 40.25]])
    np.testing.assert_array_equal(truth.centres("cluster"), [[5.5, 6]])
    assert np.isnan(truth.boxes("ring")).all()
    assert truth.source == str(p) and truth.mask is None
    # case-insensitive header, class_name, BOM, blank lines, extra columns, tabs for .tsv
    p2 = write(tmp_path / "pts.tsv", "\ufeffClass_Name\tX\tY\tnote\n\nring\t1\t2\tok\n")
    np.testing.assert_array_equal(read_truth_csv(p2).centres("ring"), [[1, 2]])
    # explicit centres may stand in for x, y
    p3 = write(tmp_path / "c.csv", "class,center_x,center_y\nring,7,8\n")
    np.testing.assert_array_equal(read_truth(p3).centres("ring"), [[7, 8]])


def test_csv_boxes_and_mixed_rows(tmp_path: Path) -> None:
    p = write(
        tmp_path / "boxes.csv",
        "class_name,x,y,width,height\n"
        "ring,10,20,30,40\n"  # centre (10 + 15, 20 + 20) = (25, 40)
        "ring,0,0,1,3\n"  # centre (0.5, 1.5)
        "cluster,7,9,,\n",  # a point in a table of boxes
    )
    truth = read_truth_csv(p, classes=["cluster", "ring"])
    assert truth.classes == ("cluster", "ring")
    np.testing.assert_array_equal(truth.centres("ring"), [[25, 40], [0.5, 1.5]])
    np.testing.assert_array_equal(truth.boxes("ring"), [[10, 20, 30, 40], [0, 0, 1, 3]])
    np.testing.assert_array_equal(truth.centres("cluster"), [[7, 9]])
    assert np.isnan(truth.boxes("cluster")).all()


def test_csv_header_only_is_an_image_without_objects(tmp_path: Path) -> None:
    truth = read_truth_csv(write(tmp_path / "none.csv", "class,x,y\n"))
    assert truth.classes == () and truth.n_objects() == 0
    assert read_truth_csv(tmp_path / "none.csv", classes=["ring"]).counts() == {"ring": 0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("\n\n", "empty file"),
        ("label,x,y\nring,1,2\n", "no 'class'"),
        ("class,x\nring,1\n", "no 'x' and 'y'"),
        ("class,x,y,width\nring,1,2,3\n", "both 'width' and 'height'"),
        ("class,x,y\nring,1,abc\n", "line 2: column 'y' is not a number"),
        ("class,x,y\nring,1,inf\n", "line 2: column 'y' is not finite"),
        ("class,x,y\nring,1,2\n,3,4\n", "line 3: empty class"),
        ("class,x,y\nring,,\n", "line 2: no position"),
        ("class,x,y,width,height\nring,1,2,-3,4\n", "line 2: negative width"),
    ],
)
def test_csv_errors(tmp_path: Path, text: str, message: str) -> None:
    p = write(tmp_path / "bad.csv", text)
    with pytest.raises(ConfigError, match=message):
        read_truth_csv(p)


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        read_truth_csv(tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match="not found"):
        read_truth(tmp_path / "missing.geojson")
    with pytest.raises(ConfigError, match=r"unknown ground-truth format '\.txt'"):
        read_truth(write(tmp_path / "truth.txt", "class,x,y\n"))
    with pytest.raises(ConfigError, match="classes"):
        read_truth(write(tmp_path / "mask.png", "x"))


# --- QuPath GeoJSON -------------------------------------------------------------------------
def test_geojson_round_trip(tmp_path: Path) -> None:
    triangle = Polygon([(0, 0), (6, 0), (0, 6)])  # centroid (2, 2), box 0, 0, 6, 6
    features = [
        box_feature(BoxL0(10, 20, 30, 40), class_name="ring", object_type="annotation"),
        geometry_feature(triangle, class_name="cluster", object_type="detection"),
        geometry_feature(Point(3.5, 4.25), class_name="ring"),
        # QuPath's points tool: one annotation holding many points
        geometry_feature(MultiPoint([(1, 1), (2, 3)]), class_name="Tumor: Positive"),
        # unclassified: a tissue outline, left out
        geometry_feature(Polygon([(0, 0), (100, 0), (100, 100)]), class_name=None),
    ]
    p = write_feature_collection(tmp_path / "truth.geojson", features)
    truth = read_truth_geojson(p)
    assert truth.classes == ("ring", "cluster", "Tumor: Positive")
    assert truth.counts() == {"ring": 2, "cluster": 1, "Tumor: Positive": 2}
    np.testing.assert_allclose(truth.centres("ring"), [[25, 40], [3.5, 4.25]])
    np.testing.assert_allclose(truth.boxes("ring")[0], [10, 20, 30, 40])
    assert np.isnan(truth.boxes("ring")[1]).all()
    np.testing.assert_allclose(truth.centres("cluster"), [[2, 2]])
    np.testing.assert_allclose(truth.boxes("cluster"), [[0, 0, 6, 6]])
    np.testing.assert_allclose(truth.centres("Tumor: Positive"), [[1, 1], [2, 3]])
    # the dispatcher, a class subset, and an object-type filter
    assert read_truth(p, classes=["cluster"]).counts() == {"cluster": 1}
    assert read_truth_geojson(p, object_types={"detection"}).counts() == {"cluster": 1}
    with pytest.raises(ConfigError, match="feature 4: object without a class"):
        read_truth_geojson(p, unclassified="error")


def test_geojson_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="empty file"):
        read_truth_geojson(write(tmp_path / "empty.geojson", ""))
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_truth_geojson(write(tmp_path / "bad.geojson", "{"))
    with pytest.raises(ConfigError, match="not QuPath GeoJSON"):
        read_truth_geojson(write(tmp_path / "num.json", "3"))


# --- label masks ----------------------------------------------------------------------------
def label_mask() -> np.ndarray:
    """A 10 x 12 mask: class 1 (ring) a 2 x 3 block and a lone pixel; class 2 (cluster) two
    pixels touching at a corner."""
    m = np.zeros((10, 12), dtype=np.uint8)
    m[2:4, 4:7] = 1  # rows 2-3, cols 4-6: mean col 5, mean row 2.5
    m[8, 0] = 1
    m[5, 9] = 2
    m[6, 10] = 2  # diagonal neighbour of (5, 9)
    return m


def test_label_array_components(tmp_path: Path) -> None:
    truth = truth_from_label_array(label_mask(), classes=["ring", "cluster"], downsample=4)
    # pixel (i, j) has its centre at ((j + 0.5) * 4, (i + 0.5) * 4) in level 0
    # block: ((5 + 0.5) * 4, (2.5 + 0.5) * 4) = (22, 12), box cols 4..6 rows 2..3 -> 16, 8, 12, 8
    # lone pixel (8, 0): (2, 34), box 0, 32, 4, 4
    np.testing.assert_array_equal(truth.centres("ring"), [[22, 12], [2, 34]])
    np.testing.assert_array_equal(truth.boxes("ring"), [[16, 8, 12, 8], [0, 32, 4, 4]])
    # 8-connected: one cluster at mean pixel (9.5, 5.5) -> ((9.5 + 0.5) * 4, (5.5 + 0.5) * 4)
    np.testing.assert_array_equal(truth.centres("cluster"), [[40, 24]])
    np.testing.assert_array_equal(truth.boxes("cluster"), [[36, 20, 8, 8]])
    assert truth.mask is not None and truth.mask_classes == ("ring", "cluster")
    assert truth.mask_downsample == (4.0, 4.0)
    # 4-connected: two clusters; min_pixels drops the lone ring pixel and both cluster pixels
    four = truth_from_label_array(
        label_mask(), classes=["ring", "cluster"], downsample=(2, 1), connectivity=1
    )
    np.testing.assert_array_equal(four.centres("cluster"), [[19, 5.5], [21, 6.5]])
    big = truth_from_label_array(label_mask(), classes=["ring", "cluster"], min_pixels=2)
    assert big.counts() == {"ring": 1, "cluster": 1}

    # subset renumbers the mask's labels
    sub = truth.subset(["cluster"])
    assert sub.mask_classes == ("cluster",) and sub.mask is not None
    np.testing.assert_array_equal(sub.mask, (label_mask() == 2).astype(np.uint8))


@pytest.mark.parametrize("suffix", [".png", ".tif", ".npy"])
def test_mask_files_round_trip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"labels{suffix}"
    m = label_mask()
    if suffix == ".png":
        from PIL import Image

        Image.fromarray(m).save(path)
    elif suffix == ".tif":
        import tifffile

        tifffile.imwrite(path, m.astype(np.uint16))
    else:
        np.save(path, m)
    truth = read_truth(path, classes=["ring", "cluster"], downsample=4)
    expected = truth_from_label_array(m, classes=["ring", "cluster"], downsample=4)
    for name in ("ring", "cluster"):
        np.testing.assert_array_equal(truth.centres(name), expected.centres(name))
        np.testing.assert_array_equal(truth.boxes(name), expected.boxes(name))
    assert truth.mask is not None
    np.testing.assert_array_equal(truth.mask, m)
    assert truth.source == str(path)


def test_mask_from_ome_zarr_labels(tmp_path: Path) -> None:
    from simsearch_wsi.io.labels import write_label_image

    m = label_mask()
    classes = ["ring", "cluster"]
    out = write_label_image(
        tmp_path / "out.ome.zarr",
        m,
        classes=classes,
        colors={"ring": (200, 0, 200), "cluster": (0, 90, 220)},
        name="truth",
        n_levels=1,
    )
    expected = truth_from_label_array(m, classes=classes)
    for path in (out / "labels" / "truth", out, out / "labels" / "truth" / "0"):
        truth = read_truth(path, classes=classes)
        np.testing.assert_array_equal(truth.centres("ring"), expected.centres("ring"))
        np.testing.assert_array_equal(truth.centres("cluster"), expected.centres("cluster"))


def test_mask_errors(tmp_path: Path) -> None:
    np.save(tmp_path / "m.npy", label_mask())
    with pytest.raises(ConfigError, match=r"labels range 0\.\.2 but 1 classes"):
        read_truth_mask(tmp_path / "m.npy", classes=["ring"])
    with pytest.raises(ConfigError, match="give the classes"):
        read_truth_mask(tmp_path / "m.npy", classes=[])
    with pytest.raises(ConfigError, match="downsample"):
        read_truth_mask(tmp_path / "m.npy", classes=["a", "b"], downsample=0)
    np.save(tmp_path / "rgb.npy", np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ConfigError, match="one 2-D channel"):
        read_truth_mask(tmp_path / "rgb.npy", classes=["a"])
    np.save(tmp_path / "f.npy", np.full((2, 2), 0.5))
    with pytest.raises(ConfigError, match="non-integer"):
        read_truth_mask(tmp_path / "f.npy", classes=["a"])
    np.save(tmp_path / "neg.npy", np.full((2, 2), -1))
    with pytest.raises(ConfigError, match="labels range -1"):
        read_truth_mask(tmp_path / "neg.npy", classes=["a"])
    with pytest.raises(ConfigError, match="empty file"):
        read_truth_mask(write(tmp_path / "e.png", ""), classes=["a"])
    with pytest.raises(ConfigError, match="cannot read"):
        read_truth_mask(write(tmp_path / "junk.png", "not a png"), classes=["a"])
    with pytest.raises(ConfigError, match="not found"):
        read_truth_mask(tmp_path / "missing.tif", classes=["a"])
    # float labels holding integers (ImageJ 32-bit label images) are accepted
    np.save(tmp_path / "fi.npy", label_mask().astype(np.float32))
    assert read_truth_mask(tmp_path / "fi.npy", classes=["a", "b"]).counts() == {"a": 2, "b": 1}


# --- synthetic slides -----------------------------------------------------------------------
def test_synthetic_truth_and_its_files(tmp_path: Path) -> None:
    from simsearch_wsi.synthetic import make_synthetic_slide

    slide = make_synthetic_slide(
        tmp_path / "s.tiff", width=512, height=384, n_per_class=2, n_levels=1, seed=0
    )
    truth = truth_from_synthetic(slide)
    assert truth.classes == slide.classes == ("ring", "cluster", "stripes")
    assert truth.counts() == {"ring": 2, "cluster": 2, "stripes": 2}
    for name in slide.classes:
        objs = slide.objects_of(name)
        np.testing.assert_array_equal(truth.centres(name), [o.center_l0 for o in objs])
        np.testing.assert_array_equal(
            truth.boxes(name), [[o.x_l0, o.y_l0, o.width_l0, o.height_l0] for o in objs]
        )
    # the CSV it writes loads exactly (explicit centre columns, box columns)
    from_csv = read_truth(slide.to_csv(tmp_path / "s.csv"))
    # the GeoJSON it writes loads to 0.01 px (the writer rounds coordinates)
    slide.to_geojson(tmp_path / "s.geojson")
    from_geojson = read_truth(tmp_path / "s.geojson")
    for name in slide.classes:
        np.testing.assert_array_equal(from_csv.centres(name), truth.centres(name))
        np.testing.assert_array_equal(from_csv.boxes(name), truth.boxes(name))
        np.testing.assert_allclose(from_geojson.centres(name), truth.centres(name), atol=0.01)
        np.testing.assert_allclose(from_geojson.boxes(name), truth.boxes(name), atol=0.01)
    # a class with no objects is kept by truth_from_synthetic
    empty = make_synthetic_slide(
        tmp_path / "e.tiff", width=256, height=256, n_per_class=0, n_levels=1, classes=["ring"]
    )
    assert truth_from_synthetic(empty).counts() == {"ring": 0}
