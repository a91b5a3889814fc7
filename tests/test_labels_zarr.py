"""OME-Zarr label outputs: layout, metadata, round trip, validation, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError, MetadataError
from simsearch_wsi.io import labels as labels_zarr
from simsearch_wsi.io import open_image
from simsearch_wsi.io.labels import (
    add_labels_to_ome_zarr,
    validate_label_store,
    write_label_image,
)

H, W = 300, 400
CLASSES = ("tumor", "stroma", "necrosis")
COLORS = {"tumor": (200, 0, 0), "stroma": (0, 150, 50), "necrosis": (40, 40, 220)}


def _mask(h: int = H, w: int = W) -> NDArray[np.uint8]:
    """Rectangles of classes 1 and 2 and a disc of class 3 on background 0."""
    lab = np.zeros((h, w), dtype=np.uint8)
    lab[h // 15 : h // 3, w // 13 : w // 2] = 1
    lab[h // 2 : h - h // 15, w // 8 : w * 3 // 8] = 2
    yy, xx = np.mgrid[0:h, 0:w]
    lab[(yy - h // 2) ** 2 + (xx - w * 3 // 4) ** 2 < (min(h, w) // 5) ** 2] = 3
    return lab


def _probabilities(lab: NDArray[np.uint8], k: int = 3) -> NDArray[np.float32]:
    rng = np.random.default_rng(0)
    p = rng.random((k, *lab.shape)).astype(np.float32) * 0.2
    for c in range(1, k + 1):
        p[c - 1][lab == c] += 1.0
    p /= p.sum(axis=0, keepdims=True)
    return p


def _read(group: Path, key: str) -> NDArray[Any]:
    """Array ``key`` of the Zarr group folder ``group``, read with zarr."""
    return np.asarray(zarr.open_array(str(group / key), mode="r")[...])


def _json(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return doc


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    lab = _mask()
    prob = _probabilities(lab)
    out = write_label_image(
        tmp_path_factory.mktemp("labels") / "slide.ome.zarr",
        lab,
        classes=CLASSES,
        colors=COLORS,
        probabilities=prob,
        pixel_size_um=(0.5, 0.25),
    )
    return out, lab, prob


# --- layout and metadata --------------------------------------------------------------------
def test_layout_is_ngff04_zarr_v2_blosc_lz4_numeric_levels(store: tuple[Path, Any, Any]) -> None:
    out, _, _ = store
    assert out.name == "slide.ome.zarr"
    for group in (out, out / "labels", out / "labels" / "simsearch"):
        assert (group / ".zgroup").is_file() and (group / ".zattrs").is_file()
        assert _json(group / ".zgroup")["zarr_format"] == 2
    assert not list(out.rglob("zarr.json"))
    n = 2  # 300x400: halve until the smaller side is < 256
    for group in (out, out / "labels" / "simsearch"):
        assert sorted(p.name for p in group.iterdir() if p.is_dir() and p.name != "labels") == [
            str(k) for k in range(n)
        ]
        for k in range(n):
            zarray = _json(group / str(k) / ".zarray")
            assert zarray["zarr_format"] == 2
            assert zarray["dimension_separator"] == "/"
            assert zarray["compressor"]["id"] == "blosc"
            assert zarray["compressor"]["cname"] == "lz4"
    assert _json(out / "0" / ".zarray")["dtype"] == "|u1"
    assert _json(out / "labels" / "simsearch" / "0" / ".zarray")["dtype"] == "|u1"
    assert _json(out / "labels" / ".zattrs") == {"labels": ["simsearch"]}


def test_metadata_scales_colours_and_classes(store: tuple[Path, Any, Any]) -> None:
    out, _, _ = store
    root = _json(out / ".zattrs")
    ms = root["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert [a.get("unit") for a in ms["axes"]] == [None, "micrometer", "micrometer"]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1"]
    assert [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]] == [
        [1.0, 0.5, 0.25],
        [1.0, 1.0, 0.5],
    ]
    channels = root["omero"]["channels"]
    assert [c["label"] for c in channels] == list(CLASSES)
    assert [c["color"] for c in channels] == ["C80000", "009632", "2828DC"]
    assert all(c["window"] == {"min": 0, "max": 255, "start": 0, "end": 255} for c in channels)

    label = _json(out / "labels" / "simsearch" / ".zattrs")
    lms = label["multiscales"][0]
    assert [a["name"] for a in lms["axes"]] == ["y", "x"]
    assert [d["coordinateTransformations"][0]["scale"] for d in lms["datasets"]] == [
        [0.5, 0.25],
        [1.0, 0.5],
    ]
    il = label["image-label"]
    assert il["colors"] == [
        {"label-value": 1, "rgba": [200, 0, 0, 255]},
        {"label-value": 2, "rgba": [0, 150, 50, 255]},
        {"label-value": 3, "rgba": [40, 40, 220, 255]},
    ]
    assert il["properties"] == [
        {"label-value": k, "class": c} for k, c in enumerate(CLASSES, start=1)
    ]
    assert il["source"] == {"image": "../../"}


def test_pixels_round_trip(store: tuple[Path, Any, Any]) -> None:
    out, lab, prob = store
    assert zarr.open_group(str(out), mode="r").metadata.zarr_format == 2
    np.testing.assert_array_equal(_read(out, "labels/simsearch/0"), lab)
    np.testing.assert_array_equal(_read(out, "labels/simsearch/1"), lab[::2, ::2])
    p0 = _read(out, "0")
    assert p0.shape == (3, H, W) and p0.dtype == np.uint8
    assert np.abs(p0 / 255.0 - prob).max() <= 1.0 / 255.0
    mean1 = prob.reshape(3, H // 2, 2, W // 2, 2).mean(axis=(2, 4))
    p1 = _read(out, "1")
    assert p1.shape == (3, H // 2, W // 2)
    assert np.abs(p1 / 255.0 - mean1).max() <= 1.0 / 255.0


def test_validates_and_ome_zarr_py_reads_it(store: tuple[Path, Any, Any]) -> None:
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    out, _, _ = store
    validate_label_store(out)
    location = parse_url(str(out), fmt=FormatV04())
    assert location is not None
    nodes = list(Reader(location)())
    images = [n for n in nodes if n.load(Multiscales) and not n.load(Label)]
    labels = [n for n in nodes if n.load(Label)]
    assert len(images) == 1 and len(labels) == 1
    assert [d.shape for d in images[0].data] == [(3, H, W), (3, H // 2, W // 2)]
    node = labels[0]
    assert [d.shape for d in node.data] == [(H, W), (H // 2, W // 2)]
    assert node.metadata["name"] == "simsearch"
    assert node.metadata["color"][3] == pytest.approx([40 / 255, 40 / 255, 220 / 255, 1.0])
    assert node.metadata["properties"] == {k: {"class": c} for k, c in enumerate(CLASSES, 1)}


def test_project_reader_opens_the_output(store: tuple[Path, Any, Any]) -> None:
    out, _, _ = store
    with open_image(out) as img:
        assert img.channel_names == CLASSES
        assert img.dimensions == (W, H)
        assert img.mpp == pytest.approx(0.375)


def test_without_probabilities_or_pixel_size(tmp_path: Path) -> None:
    lab = _mask(200, 260)
    out = write_label_image(
        tmp_path / "mask.ome.zarr", lab, classes=CLASSES, colors=COLORS, name="cls", n_levels=3
    )
    validate_label_store(out)
    root = _json(out / ".zattrs")["multiscales"][0]
    assert all("unit" not in a for a in root["axes"])
    assert [d["coordinateTransformations"][0]["scale"] for d in root["datasets"]] == [
        [1.0, 1.0, 1.0],
        [1.0, 2.0, 2.0],
        [1.0, 4.0, 4.0],
    ]
    display = _read(out, "0")
    assert display.shape == (1, 200, 260)
    np.testing.assert_array_equal(display[0], np.rint(lab * 85.0).astype(np.uint8))
    np.testing.assert_array_equal(_read(out, "labels/cls/2"), lab[::4, ::4])
    assert _json(out / "labels" / ".zattrs") == {"labels": ["cls"]}


def test_many_classes_use_uint16(tmp_path: Path) -> None:
    k = 300
    classes = [f"c{i}" for i in range(k)]
    colors = {c: (i % 256, 0, 0) for i, c in enumerate(classes)}
    lab = (np.arange(64 * 64, dtype=np.uint16) % (k + 1)).reshape(64, 64)
    out = write_label_image(tmp_path / "many.ome.zarr", lab, classes=classes, colors=colors)
    assert _json(out / "labels" / "simsearch" / "0" / ".zarray")["dtype"] == "<u2"
    validate_label_store(out)


# --- atomic behaviour -----------------------------------------------------------------------
def test_existing_path_refused_and_overwrite_replaces(tmp_path: Path) -> None:
    lab = _mask(64, 80)
    out = write_label_image(tmp_path / "o.ome.zarr", lab, classes=CLASSES, colors=COLORS)
    with pytest.raises(ConfigError, match=r"already exists.*overwrite=True"):
        write_label_image(out, lab, classes=CLASSES, colors=COLORS)
    flipped = np.ascontiguousarray(lab[::-1])
    write_label_image(out, flipped, classes=CLASSES, colors=COLORS, overwrite=True)
    got = _read(out, "labels/simsearch/0")
    np.testing.assert_array_equal(got, flipped)
    assert [p.name for p in tmp_path.iterdir()] == ["o.ome.zarr"]


def test_overwrite_never_replaces_a_non_zarr_folder(tmp_path: Path) -> None:
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a Zarr folder"):
        write_label_image(precious, _mask(16, 16), classes=CLASSES, colors=COLORS, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def _fail_on_call(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    real = labels_zarr._write_array
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError("disk full (simulated)")
        real(*args, **kwargs)

    monkeypatch.setattr(labels_zarr, "_write_array", flaky)


def test_failure_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = _mask(64, 80)
    _fail_on_call(monkeypatch, 2)
    with pytest.raises(OSError, match="simulated"):
        write_label_image(tmp_path / "x.ome.zarr", lab, classes=CLASSES, colors=COLORS, n_levels=2)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = _mask(64, 80)
    out = write_label_image(tmp_path / "x.ome.zarr", lab, classes=CLASSES, colors=COLORS)
    _fail_on_call(monkeypatch, 1)
    with pytest.raises(OSError, match="simulated"):
        write_label_image(out, lab * 0, classes=CLASSES, colors=COLORS, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["x.ome.zarr"]
    got = _read(out, "labels/simsearch/0")
    np.testing.assert_array_equal(got, lab)
    validate_label_store(out)


# --- input checks ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": np.zeros((4, 5, 6), np.uint8)}, "2-D"),
        ({"labels": np.full((8, 8), 4, np.uint8)}, r"0\.\.3"),
        ({"labels": np.full((8, 8), -1, np.int16)}, r"0\.\.3"),
        ({"labels": np.zeros((8, 8), np.float32)}, "integer"),
        ({"probabilities": np.zeros((3, 8, 9), np.float32)}, r"\(K, H, W\)"),
        ({"probabilities": np.zeros((2, 8, 8), np.float32)}, r"\(K, H, W\)"),
        ({"probabilities": np.full((3, 8, 8), 1.5, np.float32)}, r"\[0, 1\]"),
        ({"probabilities": np.full((3, 8, 8), np.nan, np.float32)}, "NaN"),
        ({"colors": {"tumor": (1, 2, 3), "stroma": (1, 2, 3)}}, "necrosis"),
        ({"colors": {**COLORS, "tumor": (300, 0, 0)}}, "0..255"),
        ({"classes": ("a", "a")}, "unique"),
        ({"classes": ()}, "empty"),
        ({"name": "a/b"}, "label name"),
        ({"pixel_size_um": (0.5, -1.0)}, "pixel size"),
        ({"n_levels": 10}, "too many"),
        ({"chunk": 0}, "chunk"),
    ],
)
def test_bad_inputs_raise_config_error(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {
        "labels": np.zeros((8, 8), np.uint8),
        "classes": CLASSES,
        "colors": COLORS,
        **kwargs,
    }
    if "classes" in kwargs and "colors" not in kwargs:
        args["colors"] = {c: (0, 0, 0) for c in kwargs["classes"]}
    with pytest.raises(ConfigError, match=message):
        write_label_image(tmp_path / "bad.ome.zarr", **args)
    assert list(tmp_path.iterdir()) == []


# --- labels on OME-Zarr input images --------------------------------------------------------
@pytest.fixture(params=["0.4", "0.5"])
def input_image(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    from simsearch_wsi.synthetic import make_synthetic_omezarr_slide

    return make_synthetic_omezarr_slide(
        tmp_path / f"img-{request.param}.ome.zarr",
        version=request.param,
        width=320,
        height=240,
        n_levels=3,
        classes=("ring",),
        n_per_class=1,
        motif_size_l0=24,
    )


def test_add_labels_to_input_image(input_image: Any) -> None:
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    img = input_image.path
    v05 = input_image.format == "ome-zarr-0.5"
    lab = _mask(240, 320)
    first = add_labels_to_ome_zarr(img, lab, classes=CLASSES, colors=COLORS, name="first")
    second = add_labels_to_ome_zarr(img, lab[::-1].copy(), classes=CLASSES, colors=COLORS)
    assert first == img / "labels" / "first" and second == img / "labels" / "simsearch"
    validate_label_store(img)

    if v05:
        labels_attrs = _json(img / "labels" / "zarr.json")["attributes"]["ome"]
        assert labels_attrs == {"version": "0.5", "labels": ["first", "simsearch"]}
        meta = _json(second / "zarr.json")
        assert meta["zarr_format"] == 3
        ngff = meta["attributes"]["ome"]
        assert ngff["version"] == "0.5"
        codecs = _json(second / "0" / "zarr.json")["codecs"]
        assert {"name": "blosc"}.items() <= codecs[-1].items()
    else:
        assert _json(img / "labels" / ".zattrs") == {"labels": ["first", "simsearch"]}
        ngff = _json(second / ".zattrs")
        assert ngff["multiscales"][0]["version"] == "0.4"
        assert _json(second / "0" / ".zarray")["compressor"]["cname"] == "lz4"
    assert ngff["image-label"]["properties"][0] == {"label-value": 1, "class": "tumor"}
    # same levels, shapes and physical scales as the image (mpp 0.5)
    scales = [
        d["coordinateTransformations"][0]["scale"] for d in ngff["multiscales"][0]["datasets"]
    ]
    assert scales == [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0]]
    levels = [_read(second, str(k)) for k in range(3)]
    assert [a.shape for a in levels] == [(240, 320), (120, 160), (60, 80)]
    np.testing.assert_array_equal(levels[0], lab[::-1])
    np.testing.assert_array_equal(levels[2], lab[::-1][::4, ::4])

    location = parse_url(str(img), fmt=FormatV05() if v05 else FormatV04())
    assert location is not None
    names = sorted(n.metadata["name"] for n in Reader(location)() if n.load(Label))
    assert names == ["first", "simsearch"]

    with open_image(img) as source:
        assert source.dimensions == (320, 240)
        assert source.level_count == 3
        assert source.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)

    with pytest.raises(ConfigError, match="already exists"):
        add_labels_to_ome_zarr(img, lab, classes=CLASSES, colors=COLORS, name="first")
    add_labels_to_ome_zarr(
        img, lab * 0, classes=CLASSES, colors=COLORS, name="first", overwrite=True
    )
    assert not _read(first, "0").any()
    assert sorted(p.name for p in (img / "labels").iterdir() if not p.name.startswith(".")) == [
        "first",
        "simsearch",
    ] + (["zarr.json"] if v05 else [])
    validate_label_store(img)


def test_add_labels_failure_keeps_existing_labels(
    input_image: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = input_image.path
    lab = _mask(240, 320)
    add_labels_to_ome_zarr(img, lab, classes=CLASSES, colors=COLORS, name="keep")
    before = sorted(p.name for p in (img / "labels").iterdir())
    _fail_on_call(monkeypatch, 2)
    with pytest.raises(OSError, match="simulated"):
        add_labels_to_ome_zarr(img, lab, classes=CLASSES, colors=COLORS, name="broken")
    assert sorted(p.name for p in (img / "labels").iterdir()) == before
    validate_label_store(img)


def test_add_labels_in_bioformats2raw_layout(tmp_path: Path) -> None:
    from simsearch_wsi.io.omezarr_writer import write_ome_zarr_image

    root = tmp_path / "b2r.ome.zarr"
    group = zarr.open_group(str(root), mode="w", zarr_format=2)
    group.attrs["bioformats2raw.layout"] = 3
    write_ome_zarr_image(
        root / "0", np.zeros((3, 64, 96), np.uint8), mpp=0.5, channel_names=("R", "G", "B")
    )
    lab = _mask(64, 96)
    out = add_labels_to_ome_zarr(root, lab, classes=CLASSES, colors=COLORS)
    assert out == root / "0" / "labels" / "simsearch"
    validate_label_store(root)


def test_add_labels_refuses_bad_inputs(input_image: Any, tmp_path: Path) -> None:
    img = input_image.path
    with pytest.raises(ConfigError, match=r"level-0 \(y, x\) size \(240, 320\)"):
        add_labels_to_ome_zarr(img, _mask(100, 100), classes=CLASSES, colors=COLORS)
    with pytest.raises(ConfigError, match="colors has no entry"):
        add_labels_to_ome_zarr(img, _mask(240, 320), classes=CLASSES, colors={})
    assert not (img / "labels").exists()


def test_add_labels_refuses_other_ngff_versions(tmp_path: Path) -> None:
    from simsearch_wsi.io.omezarr_writer import write_ome_zarr_image

    img = write_ome_zarr_image(
        tmp_path / "old.ome.zarr", np.zeros((1, 32, 32), np.uint8), mpp=0.5, channel_names=["C"]
    )
    attrs = _json(img / ".zattrs")
    attrs["multiscales"][0]["version"] = "0.3"
    (img / ".zattrs").write_text(json.dumps(attrs))
    with pytest.raises(MetadataError, match=r"'0\.3'.*supported: NGFF 0\.4.*0\.5"):
        add_labels_to_ome_zarr(
            img, np.zeros((32, 32), np.uint8), classes=["a"], colors={"a": (1, 2, 3)}
        )


# --- validation failures --------------------------------------------------------------------
def test_validation_reports_uncoloured_values(tmp_path: Path) -> None:
    out = write_label_image(tmp_path / "v.ome.zarr", _mask(64, 80), classes=CLASSES, colors=COLORS)
    attrs_file = out / "labels" / "simsearch" / ".zattrs"
    attrs = _json(attrs_file)
    attrs["image-label"]["colors"] = attrs["image-label"]["colors"][:2]
    attrs["image-label"]["properties"] = attrs["image-label"]["properties"][:2]
    attrs_file.write_text(json.dumps(attrs))
    with pytest.raises(MetadataError, match=r"label value\(s\) \[3\].*no colour"):
        validate_label_store(out)


def test_validation_reports_the_validators_first_message(tmp_path: Path) -> None:
    out = write_label_image(tmp_path / "v.ome.zarr", _mask(64, 80), classes=CLASSES, colors=COLORS)
    attrs_file = out / "labels" / "simsearch" / ".zattrs"
    attrs = _json(attrs_file)
    attrs["image-label"]["colors"][0]["rgba"] = [300, 0, 0, 255]
    attrs_file.write_text(json.dumps(attrs))
    with pytest.raises(MetadataError, match=r"labels/simsearch: not a valid OME-Zarr 0\.4 label"):
        validate_label_store(out)
    attrs_file = out / ".zattrs"
    attrs = _json(attrs_file)
    attrs["multiscales"][0]["axes"] = attrs["multiscales"][0]["axes"][1:]
    attrs_file.write_text(json.dumps(attrs))
    with pytest.raises(MetadataError, match=r"not a valid OME-Zarr 0\.4 image"):
        validate_label_store(out)
