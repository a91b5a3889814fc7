"""Issue 31: no command writes over one of its own inputs, whatever the path spelling; damaged
session files and stray objects fail with one typed line and change nothing.

Every case runs the CLI, then asserts a non-zero exit, one line on stderr naming the input,
no traceback, and every input byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from simsearch_wsi.cli.main import main
from simsearch_wsi.core.errors import ConfigError, OutputOverwritesInputError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.core.pathguard import check_outputs_not_inputs, naming_output
from simsearch_wsi.qupath.geojson import REJECTED_CLASS
from simsearch_wsi.review.session import SESSION_FILE, Session
from simsearch_wsi.search.similarity import Prototype
from simsearch_wsi.synthetic import make_synthetic_omezarr_slide

FAST = ["--weights", "random", "--tile-size", "512"]


# --- helpers -------------------------------------------------------------------------------------
def _digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a folder (by relative path)."""
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _refused(
    argv: Sequence[str],
    inputs: Sequence[Path],
    capsys: pytest.CaptureFixture[str],
    *,
    names: str,
    says: str = "",
) -> str:
    """Run the CLI; assert it fails with one line naming ``names`` (and ``says``) and leaves
    every input byte-identical. Returns the message."""
    before = {p: _digest(p) for p in inputs}
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code != 0, err
    # one line (after what a progress bar may have drawn before the error)
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("simsearch-wsi: error: "), err
    assert sum("simsearch-wsi:" in line for line in lines) == 1, err
    assert "Traceback" not in err
    err = lines[-1]
    assert names in err, err
    assert says in err, err
    assert ".tmp" not in err
    for p in inputs:
        assert p.exists(), f"{p} was removed"
        assert _digest(p) == before[p], f"{p} was changed"
    return err


@pytest.fixture()
def slide(tmp_path: Path, small_slides: Any) -> Path:
    """A private copy of a small synthetic slide (a bug cannot damage the shared one)."""
    copy = tmp_path / "slide.tiff"
    shutil.copy(small_slides[0].path, copy)
    return copy


@pytest.fixture()
def prototypes(tmp_path: Path, small_slides: Any) -> Path:
    """One classified rectangle per class, as QuPath exports them."""
    feats, seen = [], set()
    for f in small_slides[0].to_geojson()["features"]:
        name = f["properties"]["classification"]["name"]
        if name not in seen:
            seen.add(name)
            feats.append(f)
    path = tmp_path / "protos.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def _rect(x: float, y: float, w: float, h: float, name: str) -> dict[str, Any]:
    ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "annotation", "classification": {"name": name}},
    }


def _geojson(path: Path, *features: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": list(features)}))
    return path


def _session(root: Path, image: Path) -> Path:
    """A session with one prototype of class ring on ``image``."""
    session = Session.create(root)
    session.add_prototypes(image, [Prototype("ring", BoxL0(100, 100, 48, 48))])
    session.save()
    return root


# --- suggest: --out IMAGE in every spelling, --out ANNOTATIONS, --out SESSION ---------------------
@pytest.mark.parametrize("spelling", ["relative", "absolute", "dotdot", "symlink", "hardlink"])
def test_suggest_out_image_is_refused_in_every_spelling(
    spelling: str,
    slide: Path,
    prototypes: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 31: `suggest IMAGE --out IMAGE` replaced the slide with 43 bytes of GeoJSON."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    out = {
        "relative": "slide.tiff",
        "absolute": str(slide.resolve()),
        "dotdot": "sub/../slide.tiff",
        "symlink": "link.tiff",
        "hardlink": "hard.tiff",
    }[spelling]
    if spelling == "symlink":
        (tmp_path / "link.tiff").symlink_to(slide)
    if spelling == "hardlink":
        os.link(slide, tmp_path / "hard.tiff")
    argv = ["suggest", str(slide), "--annotations", str(prototypes), "--out", out, *FAST]
    err = _refused(
        argv, [slide, prototypes], capsys, names=str(slide), says="would replace an input"
    )
    assert f"--out {out}" in err and "the image" in err
    assert not (tmp_path / "link.tiff").exists() or (tmp_path / "link.tiff").is_symlink()


def test_suggest_out_annotations_is_refused(
    slide: Path, prototypes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 31: --out equal to --annotations overwrote the user's prototypes."""
    argv = ["suggest", str(slide), "--annotations", str(prototypes), "--out", str(prototypes)]
    _refused([*argv, *FAST], [slide, prototypes], capsys, names=str(prototypes), says="annotations")


def test_suggest_out_session_file_and_session_inside_an_omezarr_are_refused(
    slide: Path, prototypes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    session = _session(tmp_path / "s", slide)
    file = session / SESSION_FILE
    argv = ["suggest", str(slide), "--annotations", str(prototypes), "--session", str(session)]
    _refused(
        [*argv, "--out", str(file), *FAST],
        [slide, prototypes, file],
        capsys,
        names=str(file),
        says="session file",
    )
    # an annotations file given as the session's own session.json
    argv = ["suggest", str(slide), "--annotations", str(file), "--session", str(session)]
    _refused([*argv, "--out", str(tmp_path / "o.geojson"), *FAST], [file], capsys, names=str(file))
    zarr = make_synthetic_omezarr_slide(
        tmp_path / "x.ome.zarr", width=512, height=384, n_per_class=1, n_levels=1
    ).path
    for extra in (
        ["--out", str(zarr / "out.geojson")],  # a file inside the input store
        ["--out", str(zarr)],  # the store itself
        ["--session", str(zarr), "--out", str(tmp_path / "o.geojson")],
    ):
        _refused(
            ["suggest", str(zarr), "--annotations", str(prototypes), *extra, *FAST],
            [zarr, prototypes],
            capsys,
            names=str(zarr),
        )
    assert not (zarr / SESSION_FILE).exists()


# --- review, background, train, pretrain: outputs equal to their inputs ------------------------
def test_review_background_train_pretrain_outputs_equal_to_inputs_are_refused(
    slide: Path, prototypes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    session = _session(tmp_path / "s", slide)
    file = session / SESSION_FILE
    # review: the session file is rewritten; here it is also the reviewed annotations
    _refused(
        ["review", str(slide), "--annotations", str(file), "--session", str(session)],
        [slide, file],
        capsys,
        names=str(file),
        says="annotations",
    )
    for out, names in ((slide, "the image"), (file, "session file")):
        _refused(
            ["background", str(slide), "--session", str(session), "--out", str(out), *FAST],
            [slide, file],
            capsys,
            names=str(out),
            says=names,
        )
    for out, names in ((file, "session file"), (slide, "session image")):
        _refused(
            ["train", "--session", str(session), "--out", str(out), *FAST],
            [slide, file],
            capsys,
            names=str(out),
            says=names,
        )
    weights = tmp_path / "trunk.pth"
    weights.write_bytes(b"not really weights")
    _refused(
        ["pretrain", str(slide), "--out", str(slide), *FAST],
        [slide],
        capsys,
        names=str(slide),
        says="image",
    )
    _refused(
        ["pretrain", str(slide), "--out", str(weights), "--weights", str(weights)],
        [slide, weights],
        capsys,
        names=str(weights),
        says="weights",
    )


# --- predict, cohort, evaluate, demo ------------------------------------------------------------
def test_predict_cohort_evaluate_demo_outputs_equal_to_inputs_are_refused(
    slide: Path, tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model.zip"
    shutil.copy(tiny_bundle, model)
    _refused(
        ["predict", str(slide), "--model", str(model), "--out", str(model)],
        [slide, model],
        capsys,
        names=str(model),
        says="model",
    )
    out = tmp_path / "cohort"
    out.mkdir()
    manifest = out / "quantification.csv"  # the table a cohort run writes
    manifest.write_text(f"path,group\n{slide},a\n")
    for argv in (
        ["--manifest", str(manifest), "--out", str(out)],
        ["--manifest", str(manifest), "--out", str(manifest)],
    ):
        _refused(
            ["cohort", *argv, "--model", str(model)],
            [slide, model, manifest],
            capsys,
            names=str(manifest),
            says="manifest",
        )
    _refused(
        ["evaluate", "--benchmark", str(manifest), "--out", str(manifest), *FAST],
        [manifest],
        capsys,
        names=str(manifest),
        says="benchmark",
    )
    examples = tmp_path / "examples"
    examples.mkdir()
    protos = examples / "synthetic_he.prototypes.geojson"
    protos.write_text("{}")
    # an output folder beside the prototypes overwrites nothing (tests/test_demo.py); an output
    # at a prototype file's path would
    _refused(
        ["demo", "--examples", str(examples), "--out", str(protos), *FAST],
        [protos],
        capsys,
        names=str(protos),
        says="prototypes",
    )


# --- session files and objects: one typed line, the session unchanged ---------------------------
@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda d: [d], "holds a JSON object, not a JSON list"),
        (lambda d: "session", "holds a JSON object, not a JSON str"),
        (
            lambda d: {**d, "classes": {"ring": {**d["classes"]["ring"], "threshold": "0.5"}}},
            "classes['ring'].threshold must be a finite number, got '0.5' (str)",
        ),
        (
            lambda d: {**d, "prototypes": [{**d["prototypes"][0], "box": [1e308, 0, 48, 48]}]},
            "beyond any image",
        ),
    ],
    ids=["list", "string", "threshold-string", "box-1e308"],
)
def test_a_damaged_session_file_is_one_line_naming_it(
    edit: Any,
    says: str,
    slide: Path,
    prototypes: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    session = _session(tmp_path / "s", slide)
    file = session / SESSION_FILE
    file.write_text(json.dumps(edit(json.loads(file.read_text()))))
    for argv in (
        ["session", "show", str(session)],
        [
            "suggest",
            str(slide),
            "--session",
            str(session),
            "--out",
            str(tmp_path / "o.json"),
            *FAST,
        ],
        ["review", str(slide), "--annotations", str(prototypes), "--session", str(session)],
    ):
        err = _refused(argv, [slide, file], capsys, names=str(file), says=says)
        assert len(err) < 400  # 1e308 is printed compactly


def test_review_refuses_a_stray_rectangle_and_leaves_the_session_unchanged(
    slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 31: review saved a rectangle far outside the image as a prototype (exit 0), and
    every later suggest --session failed without pointing at the cause."""
    session = _session(tmp_path / "s", slide)
    file = session / SESSION_FILE
    cases = {
        "far": (_rect(50_000, 50_000, 48, 48, "ring"), "is not inside the image (1024x768)"),
        "huge": (_rect(-1e308, 10, 1e308, 48, "ring"), "beyond any image"),
        "1e308": (_rect(1e308, 1e308, 48, 48, "ring"), "at (1e+308, 1e+308)"),
        "zero": (_rect(10, 10, 0, 48, "ring"), "zero area"),
        "reserved": (_rect(10, 10, 48, 48, REJECTED_CLASS), "is reserved"),
    }
    for feature, says in cases.values():
        # a good prototype first: nothing of the file may be applied when one object is refused
        reviewed = _geojson(tmp_path / "r.geojson", _rect(200, 200, 48, 48, "ring"), feature)
        err = _refused(
            ["review", str(slide), "--annotations", str(reviewed), "--session", str(session)],
            [slide, file, reviewed],
            capsys,
            names=str(reviewed),
            says=says,
        )
        assert len(err) < 400
    assert len(Session.open(session).prototypes) == 1


@pytest.mark.parametrize(
    ("feature", "says"),
    [
        (_rect(10, 10, 48, 48, REJECTED_CLASS), f"the class {REJECTED_CLASS!r} is reserved"),
        (_rect(10, 10, 48, 48, "background"), "the class 'background' is reserved"),
        (_rect(1e308, 10, 48, 48, "ring"), "at (1e+308, 10) size 0x48 has coordinates beyond"),
    ],
    ids=["rejected", "background", "1e308"],
)
def test_suggest_refuses_reserved_classes_and_prints_numbers_compactly(
    feature: dict[str, Any],
    says: str,
    slide: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 31: 'Rejected suggestion' was accepted as a prototype class without --session; a
    1e308 coordinate was printed with 300 digits."""
    ann = _geojson(tmp_path / "p.geojson", feature)
    out = tmp_path / "o.geojson"
    argv = ["suggest", str(slide), "--annotations", str(ann), "--out", str(out)]
    err = _refused(
        [*argv, *FAST, "--cache", str(tmp_path / "c")],
        [slide, ann],
        capsys,
        names=str(ann),
        says=says,
    )
    assert len(err) < 400
    assert not out.exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_an_unwritable_out_is_named_as_given(
    slide: Path, prototypes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 31: the error named the hidden temporary (.out.geojson.1234abcd.tmp)."""
    out = "/proc/simsearch-test-out.geojson"  # /proc takes no new files, even from root
    argv = ["suggest", str(slide), "--annotations", str(prototypes), "--out", out]
    _refused(
        [*argv, *FAST, "--cache", str(tmp_path / "c")],
        [slide, prototypes],
        capsys,
        names=f"--out {out}: cannot be written",
    )


# --- the check itself -----------------------------------------------------------------------------
def test_check_outputs_not_inputs(tmp_path: Path) -> None:
    image = tmp_path / "a.tiff"
    image.write_bytes(b"x")
    store = tmp_path / "b.ome.zarr"
    (store / "0").mkdir(parents=True)
    (store / ".zattrs").write_text("{}")
    ok = [("--out", tmp_path / "out.geojson")]
    check_outputs_not_inputs(ok, [("image", image), ("image", store)])
    check_outputs_not_inputs([], [("image", image)], into=[("--out", tmp_path)])  # inputs inside
    refused = [
        ([("--out", image)], [], "would replace an input"),
        ([("--out", store / ".zattrs")], [], "lies inside the input"),
        ([("--out", tmp_path)], [], "would replace a folder holding the input"),
        ([], [("--out", store)], "is the input"),
        ([], [("--out", store / "labels")], "lies inside the input"),
        ([], [("--out", image)], "give an output folder, not an input file"),
    ]
    for outputs, into, says in refused:
        with pytest.raises(OutputOverwritesInputError, match=says) as info:
            check_outputs_not_inputs(outputs, [("image", image), ("image", store)], into=into)
        assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    # a document rewritten on purpose is not refused as its own input, but is another's
    doc = tmp_path / "s" / "session.json"
    check_outputs_not_inputs([], [("image", image)], updated=[("session file", doc)])
    with pytest.raises(OutputOverwritesInputError, match="session file"):
        check_outputs_not_inputs([("--out", doc)], [], updated=[("session file", doc)])
    with pytest.raises(OutputOverwritesInputError, match="annotations"):
        check_outputs_not_inputs([], [("annotations", doc)], updated=[("session file", doc)])


def test_naming_output_names_the_path_the_user_gave(tmp_path: Path) -> None:
    out = tmp_path / "o.geojson"
    with (
        pytest.raises(OSError, match=r"--out .*o\.geojson: cannot be written") as info,
        naming_output("--out", out),
    ):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".o.geojson.1a2b.tmp"))
    assert ".tmp" not in str(info.value)
    with (
        pytest.raises(FileNotFoundError, match="elsewhere"),  # not about the output: unchanged
        naming_output("--out", out),
    ):
        raise FileNotFoundError(2, "No such file", str(tmp_path / "elsewhere.tiff"))


def test_a_cohort_refuses_an_input_where_a_plate_plot_would_go(tmp_path: Path) -> None:
    """Issue 31 gap: ``plate_<name>.png`` (one per plate) is checked against the inputs too."""
    from simsearch_wsi.cohort.run import cohort_outputs
    from simsearch_wsi.infer.predict import PredictTarget, refuse_overwriting_inputs

    out = tmp_path / "run"
    out.mkdir()
    picture = out / "plate_P1.png"  # an image the user keeps in the output folder
    picture.write_bytes(b"\x89PNG")
    field = PredictTarget(
        path=str(tmp_path / "P1.ome.zarr" / "A" / "1" / "0"),
        stem="P1_A1_f0",
        extra={"plate": "P1.ome.zarr", "well": "A1"},
        plate=str(tmp_path / "P1.ome.zarr"),
    )
    image = PredictTarget(path=str(picture), stem="plate_P1_image")
    assert cohort_outputs([field, image])[-1] == "plate_P1.png"
    with pytest.raises(OutputOverwritesInputError, match=r"plate_P1\.png"):
        refuse_overwriting_inputs([field, image], out, outputs=cohort_outputs([field, image]))
    refuse_overwriting_inputs([image], out, outputs=cohort_outputs([image]))  # no plate: no plot
    assert picture.read_bytes() == b"\x89PNG"


def test_an_unwritable_out_is_refused_before_the_session_changes(
    slide: Path, prototypes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 31 gap: ``suggest --session S --out X`` with X unwritable saved the session's
    'suggestions sent' first and then failed on X; now X is checked before any work."""
    session = _session(tmp_path / "s", slide)
    before = _digest(session / SESSION_FILE)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out.geojson"
    argv = ["suggest", str(slide), "--annotations", str(prototypes), "--session", str(session)]
    err = _refused(
        [*argv, "--out", str(out), *FAST],
        [slide, prototypes, session / SESSION_FILE],
        capsys,
        names=str(out),
        says="cannot be written",
    )
    assert "is not a folder" in err
    assert _digest(session / SESSION_FILE) == before
    fresh = tmp_path / "new-session"
    argv[-1] = str(fresh)
    _refused([*argv, "--out", str(out), *FAST], [slide], capsys, names=str(out))
    assert not fresh.exists()  # not even created


def test_check_writable(tmp_path: Path) -> None:
    from simsearch_wsi.core.errors import OutputNotWritableError
    from simsearch_wsi.core.pathguard import check_writable

    check_writable("--out", tmp_path / "new" / "deeper" / "x.csv")  # folders get created
    check_writable("--out", None)
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputNotWritableError, match=r"--out .*f/x\.csv: cannot be written"):
        check_writable("--out", tmp_path / "f" / "x.csv")
