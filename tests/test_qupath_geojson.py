"""QuPath GeoJSON dialect: reading 0.2/0.3/0.4+ exports, writing 0.4-0.7 imports, validation."""

from __future__ import annotations

import copy
import json
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shapely.geometry import LineString, MultiPoint, MultiPolygon, Point, Polygon
from shapely.geometry.base import BaseGeometry

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.qupath.geojson import (
    BACKGROUND_CLASS,
    REJECTED_CLASS,
    RESERVED_CLASSES,
    Annotation,
    box_feature,
    class_color,
    feature_collection,
    geometry_feature,
    read_annotations,
    read_features,
    validate_feature_collection,
    write_feature_collection,
)

DATA = Path(__file__).parent / "data" / "qupath"
SAMPLES = ["qupath_0.2.geojson", "qupath_0.3.geojson", "qupath_0.4.geojson"]

SQUARE_WITH_HOLE = Polygon(
    [(10, 10), (110, 10), (110, 110), (10, 110)], [[(40, 40), (60, 40), (60, 60), (40, 60)]]
)
TWO_PARTS = MultiPolygon(
    [
        Polygon([(0, 0), (30, 0), (30, 30), (0, 30)], [[(10, 10), (20, 10), (20, 20), (10, 20)]]),
        Polygon([(50.12, 50.46), (80.5, 50), (65.25, 90.75)]),
    ]
)


def _content(a: Annotation) -> tuple[Any, ...]:
    assert a.geometry is not None
    n_holes = len(a.geometry.interiors) if isinstance(a.geometry, Polygon) else None
    return (
        a.class_name,
        a.object_type,
        a.color,
        a.measurements,
        a.name,
        a.is_locked,
        a.box,
        a.is_rectangle,
        round(a.geometry.area, 6),
        n_holes,
    )


# --- reading the three QuPath generations ------------------------------------------------------


@pytest.mark.parametrize("sample", SAMPLES)
def test_each_qupath_version_reads_into_the_same_content(sample: str) -> None:
    got = [_content(a) for a in read_annotations(DATA / sample)]
    measurements = {"Area px^2": 200.0, "Eosin: Mean": 0.25}  # NaN "Circularity" dropped
    assert got == [
        ("Tumor", "annotation", (200, 0, 0), {}, "first tumour", True,
         BoxL0(100, 200, 200, 60), True, 12000.0, 0),
        ("Stroma", "annotation", (150, 200, 150), {}, None, False,
         BoxL0(400, 400, 200, 200), False, 37500.0, 1),
        ("Immune cells", "detection", (160, 90, 160), measurements, None, False,
         BoxL0(700, 100, 20, 20), False, 200.0, 0),
    ]  # fmt: skip


def test_legacy_type_ids_are_types_not_ids() -> None:
    v02 = read_annotations(DATA / "qupath_0.2.geojson")
    assert [a.id for a in v02] == [None, None, None]
    v04 = read_annotations(DATA / "qupath_0.4.geojson")
    assert [a.id for a in v04] == [f"5b0ee3a7-6f3e-4d0e-9a7c-1f2a3b4c5d0{i}" for i in (1, 2, 3)]


@pytest.mark.parametrize(
    ("legacy_id", "object_type"),
    [
        ("PathAnnotationObject", "annotation"),
        ("PathDetectionObject", "detection"),
        ("PathCellObject", "cell"),
        ("PathTileObject", "tile"),
    ],
)
def test_legacy_id_maps_to_object_type(legacy_id: str, object_type: str) -> None:
    feat = {"type": "Feature", "id": legacy_id, "geometry": _square(), "properties": {}}
    (a,) = read_features(feat)
    assert (a.object_type, a.id) == (object_type, None)


def test_object_type_spellings() -> None:
    def otype(props: dict[str, Any], fid: str | None = None) -> str:
        feat: dict[str, Any] = {"type": "Feature", "geometry": _square(), "properties": props}
        if fid is not None:
            feat["id"] = fid
        return read_features(feat)[0].object_type

    assert otype({}) == "annotation"  # QuPath's default
    assert otype({"object_type": "detection"}) == "detection"
    assert otype({"objectType": "cell", "object_type": "tile"}) == "cell"  # camelCase wins
    assert otype({"objectType": "tile"}, fid="PathDetectionObject") == "tile"  # props win
    assert otype({"objectType": "Detection"}) == "detection"
    assert otype({"objectType": "tma_core"}) == "tmaCore"


def test_packed_color_rgb_decoding() -> None:
    # Java packs ARGB into a signed int32: 0xFFC80000 = 4291297280 = 2**32 - 3670016.
    assert 0xFFC80000 - 2**32 == -3670016
    assert (0xFFC80000 >> 16) & 0xFF == 200

    def color(cls: Any) -> tuple[int, int, int] | None:
        feat = {"type": "Feature", "geometry": _square(), "properties": {"classification": cls}}
        return read_features([feat])[0].color

    assert color({"name": "Tumor", "colorRGB": -3670016}) == (200, 0, 0)
    assert color({"name": "Stroma", "colorRGB": -6895466}) == (150, 200, 150)
    assert color({"name": "A", "colorRGB": 0x00123456}) == (0x12, 0x34, 0x56)  # no alpha
    assert color({"name": "A", "colorRGB": 0x7F123456 - 0}) == (0x12, 0x34, 0x56)
    assert color({"name": "A", "color": [1, 2, 3, 128]}) == (1, 2, 3)  # RGBA, alpha last
    assert color({"name": "A", "color": [1, 2]}) is None
    assert color("Tumor") is None


def test_classification_forms() -> None:
    def cls(value: Any) -> str | None:
        feat = {"type": "Feature", "geometry": _square(), "properties": {"classification": value}}
        return read_features(feat)[0].class_name

    assert cls("Tumor: Positive") == "Tumor: Positive"
    assert cls({"name": "Tumor", "color": [200, 0, 0]}) == "Tumor"
    assert cls({"names": ["Tumor", "Positive"], "color": [200, 0, 0]}) == "Tumor: Positive"
    legacy_derived = {"name": "Positive", "colorRGB": -1, "parentClass": {"name": "Tumor"}}
    assert cls(legacy_derived) == "Tumor: Positive"
    assert cls({}) is None
    assert cls("") is None
    assert cls(None) is None


def test_measurements_list_and_object_read_the_same() -> None:
    old = [
        {"name": "a", "value": 1},
        {"name": "b", "value": 2.5},
        {"name": "nan", "value": float("nan")},
        {"name": "inf", "value": float("inf")},
        {"name": "text", "value": "3"},
        {"name": "flag", "value": True},
        {"value": 4.0},
        "garbage",
    ]
    new = {"a": 1, "b": 2.5, "nan": float("nan"), "inf": -math.inf, "text": "3", "none": None}
    got = [
        read_features(
            {"type": "Feature", "geometry": _square(), "properties": {"measurements": m}}
        )[0].measurements
        for m in (old, new)
    ]
    assert got == [{"a": 1.0, "b": 2.5}, {"a": 1.0, "b": 2.5}]
    assert all(type(v) is float for v in got[0].values())


def test_containers_array_feature_collection_and_path(tmp_path: Path) -> None:
    feat = box_feature(BoxL0(1, 2, 3, 4), class_name="x")
    for doc in (feat, [feat, feat], feature_collection([feat])):
        back = read_features(doc)
        assert back and all(a.box == BoxL0(1, 2, 3, 4) for a in back)
    path = write_feature_collection(tmp_path / "a.geojson", [feat])
    assert read_features(path) == read_features(str(path)) == read_annotations(path)
    with pytest.raises(ConfigError, match="not QuPath GeoJSON"):
        read_features({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1]]]})
    with pytest.raises(ConfigError, match="not QuPath GeoJSON"):
        read_features({"type": "Topology"})


def test_missing_file_and_bad_json_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        read_annotations(tmp_path / "nope.geojson")
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_annotations(bad)


def _square() -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]]}


@pytest.mark.parametrize(
    ("geometry", "message"),
    [
        (None, "missing or null"),
        ("absent", "missing or null"),
        ({"type": "Polygon", "coordinates": [[["0", "0"], ["4", "0"], ["4", "4"]]]}, "numbers"),
        ({"type": "Polygon", "coordinates": "0,0 4,0 4,4"}, "nested arrays"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [4, float("nan")], [4, 4]]]}, "non-finite"),
        ({"type": "Point", "coordinates": [float("inf"), 1]}, "non-finite"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [4, 0]]]}, "malformed Polygon"),
        ({"type": "Polygon", "coordinates": []}, "empty geometry"),
        ({"type": "Polygon"}, "without 'coordinates'"),
        ({"type": "Circle", "coordinates": [0, 0]}, "unsupported geometry type 'Circle'"),
        ({"type": "Point", "coordinates": [1]}, r"must be \[x, y\]"),
        ({"type": "GeometryCollection"}, "geometries"),
        ([1, 2], "must be an object"),
    ],
)
def test_malformed_geometry_raises_config_error_naming_the_feature(
    geometry: Any, message: str
) -> None:
    bad: dict[str, Any] = {"type": "Feature", "id": "abc", "properties": {}}
    if geometry != "absent":
        bad["geometry"] = geometry
    good = {"type": "Feature", "geometry": _square()}
    with pytest.raises(ConfigError, match=message) as info:
        read_features([good, bad], where="in.geojson")
    assert "in.geojson feature 1 (id 'abc')" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "feature",
    [
        3,
        {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 0]]]},
        {"type": "Feature", "geometry": _square(), "properties": ["objectType"]},
    ],
)
def test_malformed_feature_raises_config_error(feature: Any) -> None:
    with pytest.raises(ConfigError, match="feature 0"):
        read_features([feature])


def test_nucleus_geometry_is_accepted_and_ignored() -> None:
    cell = {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": _square(),
        "nucleusGeometry": {"type": "Polygon", "coordinates": [[[1, 1], [2, 1], [2, 2], [1, 1]]]},
        "properties": {"objectType": "cell", "classification": "Tumor"},
    }
    (a,) = read_features(cell)
    assert a.object_type == "cell" and a.box == BoxL0(0, 0, 4, 4)
    assert a.geometry is not None and a.geometry.area == 16


@pytest.mark.parametrize(
    ("ring", "expected", "width"),
    [
        ([[0, 0], [10, 0], [10, 5], [0, 5], [0, 0]], True, 10),
        ([[0, 0], [0, 5], [10, 5], [10, 0]], True, 10),  # clockwise, unclosed
        ([[3, 0], [3, 0], [3, 5], [3, 5], [3, 0]], True, 0),  # zero width: callers report it
        ([[0, 0], [10, 0], [0, 5], [10, 5], [0, 0]], False, 10),  # "Z" bowtie
        ([[5, 0], [10, 5], [5, 10], [0, 5], [5, 0]], False, 10),  # diamond
        ([[0, 0], [5, 0], [10, 0], [10, 5], [0, 5], [0, 0]], False, 10),  # 5 corners
    ],
)
def test_is_rectangle(ring: list[list[float]], expected: bool, width: float) -> None:
    geom = {"type": "Polygon", "coordinates": [ring]}
    (a,) = read_features({"type": "Feature", "geometry": geom})
    assert (a.is_rectangle, a.box.width_l0) == (expected, width)


def test_rectangle_with_hole_or_multipolygon_is_not_a_rectangle() -> None:
    for geom in (SQUARE_WITH_HOLE, MultiPolygon([Polygon([(0, 0), (1, 0), (1, 1), (0, 1)])])):
        (a,) = read_features(geometry_feature(geom, class_name="x"))
        assert not a.is_rectangle


def test_annotation_positional_construction_still_works() -> None:
    a = Annotation("A", BoxL0(0, 0, 1, 1), True, "annotation")
    assert (a.id, a.geometry, a.measurements, a.color, a.name, a.is_locked) == (
        None,
        None,
        {},
        None,
        None,
        False,
    )


# --- writing -----------------------------------------------------------------------------------


def _through_json(feature: dict[str, Any]) -> list[Annotation]:
    return read_features(json.loads(json.dumps(feature, allow_nan=False)))


def test_polygon_with_hole_round_trips() -> None:
    (a,) = _through_json(geometry_feature(SQUARE_WITH_HOLE, class_name="Stroma"))
    assert isinstance(a.geometry, Polygon)
    assert len(a.geometry.interiors) == 1
    assert a.geometry.area == pytest.approx(SQUARE_WITH_HOLE.area, abs=0.01)
    assert a.box == BoxL0(10, 10, 100, 100)
    assert (a.class_name, a.object_type, a.color) == ("Stroma", "annotation", class_color("Stroma"))


def test_multipolygon_round_trips() -> None:
    (a,) = _through_json(geometry_feature(TWO_PARTS, class_name="Tumor", object_type="detection"))
    assert isinstance(a.geometry, MultiPolygon)
    assert [len(p.interiors) for p in a.geometry.geoms] == [1, 0]
    assert a.geometry.area == pytest.approx(TWO_PARTS.area, abs=0.01)
    assert a.object_type == "detection"


def test_writer_rounds_closes_and_orients_rings() -> None:
    tri = Polygon([(0.123456, 0.0), (0.0, 10.987654), (10.5, 10.5)])  # clockwise (y-up terms)
    feat = geometry_feature(tri, class_name="x")
    ring = feat["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]
    assert all(v == round(v, 2) for p in ring for v in p)
    assert [0.12, 0.0] in ring and [0.0, 10.99] in ring
    assert Polygon(ring).exterior.is_ccw
    hole = geometry_feature(SQUARE_WITH_HOLE, class_name="x")["geometry"]["coordinates"]
    assert Polygon(hole[0]).exterior.is_ccw and not Polygon(hole[1]).exterior.is_ccw
    tiny = geometry_feature(Point(-0.001, 3), class_name="x")["geometry"]["coordinates"]
    assert json.dumps(tiny) == "[0.0, 3.0]"  # not "-0.0"


def test_box_feature_keeps_its_ring_and_defaults() -> None:
    f = box_feature(BoxL0(1.004, 2, 3, 4), class_name="ring", measurements={"s": 0.5})
    ring = [[1.0, 2.0], [4.0, 2.0], [4.0, 6.0], [1.0, 6.0], [1.0, 2.0]]  # the pre-0.4 ring order
    assert f["geometry"]["coordinates"] == [ring]
    props = f["properties"]
    assert props["objectType"] == "detection"
    assert props["classification"] == {"name": "ring", "color": list(class_color("ring"))}
    assert props["measurements"] == {"s": 0.5}
    assert str(uuid.UUID(f["id"])) == f["id"]
    assert box_feature(BoxL0(0, 0, 1, 1), class_name="a")["id"] != f["id"]


def test_writer_always_writes_color_and_only_finite_measurements() -> None:
    f = geometry_feature(
        Point(3, 4),
        class_name="never seen before",
        measurements={"ok": 1, "nan": float("nan"), "inf": float("inf")},
        name="p",
        is_locked=True,
        id="5B0EE3A7-6F3E-4D0E-9A7C-1F2A3B4C5D01",
    )
    props = f["properties"]
    assert props["classification"]["color"] == list(class_color("never seen before"))
    assert props["measurements"] == {"ok": 1.0}
    assert (props["name"], props["isLocked"]) == ("p", True)
    assert f["id"] == "5b0ee3a7-6f3e-4d0e-9a7c-1f2a3b4c5d01"
    only_nan = geometry_feature(Point(1, 1), class_name="a", measurements={"x": math.nan})
    assert "measurements" not in only_nan["properties"]
    unclassified = geometry_feature(Point(1, 1), class_name=None)
    assert "classification" not in unclassified["properties"]
    custom = geometry_feature(Point(1, 1), class_name="a", color=(1, 2, 3))
    assert custom["properties"]["classification"]["color"] == [1, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"geometry": Polygon()}, "empty geometry"),
        ({"geometry": MultiPolygon()}, "empty geometry"),
        ({"object_type": "Annotation"}, "not one QuPath imports"),
        ({"object_type": "tmaCore"}, "not one QuPath imports"),
        ({"geometry": Polygon([(0, 0), (4, 4), (4, 0), (0, 4)])}, "invalid"),
        ({"geometry": Polygon([(0, 0), (0.001, 0), (0.001, 0.001)])}, "invalid after rounding"),
        ({"geometry": Point(math.nan, 0)}, "non-finite"),
        ({"geometry": Point(0, 0).union(LineString([(1, 1), (2, 2)]))}, "cannot write"),
        ({"id": "PathAnnotationObject"}, "not a UUID"),
        ({"color": (256, 0, 0)}, "colour"),
        ({"color": (1.5, 0, 0)}, "colour"),
        ({"class_name": ""}, "non-empty"),
        ({"measurements": {"x": "high"}}, "not a number"),
    ],
)
def test_writer_refuses_what_qupath_cannot_import(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"geometry": SQUARE_WITH_HOLE, "class_name": "x"} | kwargs
    geometry = args.pop("geometry")
    with pytest.raises(ConfigError, match=message):
        geometry_feature(geometry, **args)


def test_zero_size_box_is_refused() -> None:
    with pytest.raises(ConfigError, match="invalid"):
        box_feature(BoxL0(5, 5, 0, 10), class_name="x")


def test_write_feature_collection_writes_a_valid_collection(tmp_path: Path) -> None:
    feats = [box_feature(BoxL0(0, 0, 5, 5), class_name="x")]
    path = write_feature_collection(tmp_path / "out.geojson", feats)
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc == {"type": "FeatureCollection", "features": feats}
    validate_feature_collection(path, image_size_l0=(5, 5))


# --- validation --------------------------------------------------------------------------------


def _everything_writers_write() -> list[dict[str, Any]]:
    geoms: list[BaseGeometry] = [
        SQUARE_WITH_HOLE,
        TWO_PARTS,
        Point(5, 5),
        MultiPoint([(1, 1), (2, 3)]),
        LineString([(0, 0), (50, 60), (70, 10)]),
    ]
    feats = [
        geometry_feature(g, class_name=c, object_type=t)
        for g in geoms
        for c in ("Tumor", None)
        for t in ("annotation", "detection", "tile", "cell")
    ]
    feats.append(box_feature(BoxL0(0, 0, 120, 120), class_name="x", measurements={"s": 1.0}))
    feats.append(
        geometry_feature(Point(1, 1), class_name=REJECTED_CLASS, name="n", is_locked=False)
    )
    return feats


def test_validator_accepts_everything_the_writers_write() -> None:
    doc = feature_collection(_everything_writers_write())
    validate_feature_collection(doc, image_size_l0=(120, 120))
    validate_feature_collection(json.loads(json.dumps(doc)), image_size_l0=(119, 119))


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(feat: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = feat
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


_DELETE = object()
_BOWTIE = {"type": "Polygon", "coordinates": [[[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]]}
_OUTSIDE = {"type": "Polygon", "coordinates": [[[90, 90], [102, 90], [102, 95], [90, 90]]]}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set("properties.classification.color", _DELETE), "without 'color'"),
        (_set("properties.classification.color", [1, 2]), "3 integers"),
        (_set("properties.classification.color", [1.0, 2, 3]), "3 integers"),
        (_set("properties.classification.color", [1, 2, 300]), "3 integers"),
        (_set("properties.classification", "Tumor"), "object with a non-empty name"),
        (_set("properties.classification.name", ""), "object with a non-empty name"),
        (_set("properties.measurements.s", math.nan), "not a finite number"),
        (_set("properties.measurements.s", "1.0"), "not a finite number"),
        (_set("properties.measurements", [{"name": "s", "value": 1}]), "must be an object"),
        (_set("properties.objectType", "Annotation"), "objectType 'Annotation'"),
        (_set("properties.objectType", _DELETE), "objectType None"),
        (_set("properties.object_type", "detection"), None),  # extra legacy key is harmless
        (_set("id", "PathAnnotationObject"), "UUID"),
        (_set("id", "not-a-uuid"), "UUID"),
        (_set("id", uuid.uuid4().hex), "UUID"),  # no hyphens: Java's UUID.fromString refuses
        (_set("id", "{" + str(uuid.uuid4()) + "}"), "UUID"),
        (_set("id", _DELETE), "UUID"),
        (_set("geometry", _BOWTIE), "invalid geometry"),
        (_set("geometry", _OUTSIDE), "outside the 100 x 100 image"),
        (_set("geometry", None), "geometry type None"),
        (_set("geometry.type", "MultiLineString"), "geometry type 'MultiLineString'"),
        (_set("geometry.coordinates", []), "empty geometry"),
        (_set("type", "Polygon"), "not a GeoJSON Feature"),
        (_set("properties", None), "'properties' must be an object"),
        (_set("properties.isLocked", "true"), "isLocked"),
        (_set("properties.name", 3), "name must be a string"),
        (_set("properties.color", [1, 2, 3, 4]), "color must be 3 integers"),
        (_set("properties.metadata", {"k": 1}), "metadata"),
        (_set("properties.metadata", {"k": "v"}), None),
    ],
)
def test_validator_rejects_each_defect_naming_the_feature(
    mutate: Callable[[dict[str, Any]], None], message: str | None
) -> None:
    good = [
        box_feature(BoxL0(0, 0, 10, 10), class_name="a", measurements={"s": 1.0}),
        box_feature(BoxL0(5, 5, 10, 10), class_name="b", measurements={"s": 2.0}),
    ]
    doc = feature_collection(copy.deepcopy(good))
    validate_feature_collection(doc, image_size_l0=(100, 100))
    mutate(doc["features"][1])
    if message is None:
        validate_feature_collection(doc, image_size_l0=(100, 100))
        return
    with pytest.raises(ConfigError, match=message) as info:
        validate_feature_collection(doc, image_size_l0=(100, 100), where="out.geojson")
    assert str(info.value).startswith("out.geojson feature 1")
    assert "\n" not in str(info.value)


def test_validator_image_tolerance_is_one_pixel() -> None:
    f = geometry_feature(Polygon([(-1, -1), (101, -1), (101, 101)]), class_name="a")
    validate_feature_collection(feature_collection([f]), image_size_l0=(100, 100))
    g = geometry_feature(Polygon([(-1.5, 0), (10, 0), (10, 10)]), class_name="a")
    with pytest.raises(ConfigError, match=r"feature 1 .*outside"):
        validate_feature_collection(feature_collection([f, g]), image_size_l0=(100, 100))


def test_validator_rejects_duplicate_ids_and_non_collections() -> None:
    f = box_feature(BoxL0(0, 0, 1, 1), class_name="a")
    with pytest.raises(ConfigError, match=r"feature 1 .*duplicate id"):
        validate_feature_collection(feature_collection([f, copy.deepcopy(f)]))
    with pytest.raises(ConfigError, match="not a FeatureCollection"):
        validate_feature_collection([f])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not a FeatureCollection"):
        validate_feature_collection(f)
    with pytest.raises(ConfigError, match="'features' list"):
        validate_feature_collection({"type": "FeatureCollection"})


@pytest.mark.parametrize("sample", SAMPLES[:2])
def test_validator_rejects_old_exports(sample: str) -> None:
    doc = json.loads((DATA / sample).read_text(encoding="utf-8"))
    if isinstance(doc, list):
        doc = feature_collection(doc)
    with pytest.raises(ConfigError, match="feature 0"):
        validate_feature_collection(doc)


def test_rewriting_old_exports_gives_valid_0_4_features() -> None:
    """Everything read from any version can be written back as valid 0.4+ GeoJSON."""
    for sample in SAMPLES:
        feats = [
            geometry_feature(
                a.geometry,
                class_name=a.class_name,
                object_type=a.object_type,
                measurements=a.measurements,
                name=a.name,
                color=a.color,
                is_locked=a.is_locked,
            )
            for a in read_annotations(DATA / sample)
            if a.geometry is not None
        ]
        validate_feature_collection(feature_collection(feats), image_size_l0=(800, 800))
        back = read_features(feature_collection(feats))
        assert [_content(a) for a in back] == [
            _content(a) for a in read_annotations(DATA / "qupath_0.4.geojson")
        ]


# --- class names -------------------------------------------------------------------------------


def test_reserved_classes_and_colors() -> None:
    assert BACKGROUND_CLASS == "background"  # search.py's proposed background patches
    assert REJECTED_CLASS not in ("Negative", "negative")  # QuPath's built-in class
    assert set(RESERVED_CLASSES) == {BACKGROUND_CLASS, REJECTED_CLASS}
    reserved = {class_color(c) for c in RESERVED_CLASSES}
    assert len(reserved) == len(RESERVED_CLASSES)
    derived = {class_color(f"class {i}") for i in range(2000)}
    assert not reserved & derived


def test_class_color_is_stable_across_runs() -> None:
    # literal values: a change in the derivation would recolour every user's existing classes
    assert class_color("Tumor") == (124, 156, 149)
    assert class_color("ring") == (200, 0, 200)  # same as the synthetic ground truth
    assert class_color(BACKGROUND_CLASS) == (128, 128, 128)
    assert class_color(REJECTED_CLASS) == (0, 0, 0)
    assert class_color("tumour_bud") != class_color("tumour_buds")
    assert all(40 <= v <= 215 for i in range(200) for v in class_color(f"c{i}"))


def test_box_features_in_bulk_equal_box_feature_one_by_one() -> None:
    """The vectorised writer gives what box_feature gives per box (apart from the random ids),
    and the collection validates."""
    from simsearch_wsi.core.geometry import BoxL0
    from simsearch_wsi.qupath.geojson import box_features

    rng = np.random.default_rng(0)
    boxes = np.column_stack([rng.uniform(0, 900, (50, 2)), rng.uniform(0.5, 80, (50, 2))])
    names = [("ring", "Tumor", "cluster")[i % 3] for i in range(50)]
    meas = [{"probability ring": float(v), "bad": math.nan} for v in rng.uniform(0, 1, 50)]
    colors = {"Tumor": (200, 0, 0)}
    bulk = box_features(boxes, class_names=names, measurements=meas, colors=colors)
    for b, name, m, f in zip(boxes, names, meas, bulk, strict=True):
        one = box_feature(BoxL0(*b), class_name=name, measurements=m, color=colors.get(name))
        assert f["geometry"] == one["geometry"] and f["properties"] == one["properties"]
    validate_feature_collection(feature_collection(bulk))
    with pytest.raises(ConfigError, match="zero width"):
        box_features(np.array([[1.0, 1.0, 0.001, 5.0]]), class_names=["ring"])
    with pytest.raises(ConfigError, match="one class name"):
        box_features(boxes, class_names=names[:3])
