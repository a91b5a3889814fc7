"""The review session and the suggest -> review -> background loop through the CLI."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from simsearch_wsi.cli.main import main
from simsearch_wsi.core.errors import ConfigError, MetadataError
from simsearch_wsi.qupath.geojson import (
    BACKGROUND_CLASS,
    REJECTED_CLASS,
    validate_feature_collection,
)
from simsearch_wsi.review.session import SESSION_FILE, Session


def _protos(slide: Any, path: Path, per_class: int = 1) -> Path:
    feats, seen = [], {}
    for f in slide.to_geojson()["features"]:
        name = f["properties"]["classification"]["name"]
        if seen.get(name, 0) < per_class:
            seen[name] = seen.get(name, 0) + 1
            feats.append(f)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def _set_class(feature: dict[str, Any], name: str) -> dict[str, Any]:
    out = json.loads(json.dumps(feature))
    out["properties"]["classification"] = {"name": name, "color": [1, 2, 3]}
    return out


@pytest.fixture()
def engine_args(tmp_path: Path) -> list[str]:
    return ["--weights", "random", "--cache", str(tmp_path / "cache"), "--tile-size", "512"]


def test_full_review_loop(
    synthetic_slide: Any, tmp_path: Path, engine_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    session_dir = tmp_path / "session"
    sug = tmp_path / "suggestions.geojson"
    image = str(synthetic_slide.path)
    assert (
        main(
            [
                "suggest",
                image,
                "--annotations",
                str(_protos(synthetic_slide, tmp_path / "p.geojson")),
                "--out",
                str(sug),
                "--session",
                str(session_dir),
                "--threshold",
                "ring=0.4",
                "--background",
                "2",
                *engine_args,
            ]
        )
        == 0
    )
    capsys.readouterr()
    session = Session.open(session_dir)
    assert set(session.classes) == {"ring", "cluster", "stripes"}
    assert session.thresholds["ring"] == 0.4 and session.thresholds["cluster"] == 0.5
    assert session.patch_size_l0 is not None and len(session.prototypes) == 3
    size = (synthetic_slide.width, synthetic_slide.height)
    validate_feature_collection(json.loads(sug.read_text()), image_size_l0=size)
    features = json.loads(sug.read_text())["features"]
    assert {f["id"] for f in features} == set(session.suggestions)  # ids travel to QuPath
    ring = [f for f in features if f["properties"]["classification"]["name"] == "ring"]
    bg = [f for f in features if f["properties"]["classification"]["name"] == BACKGROUND_CLASS]
    assert len(ring) >= 3 and len(bg) == 4
    # the user: keeps ring[0], rejects ring[1], relabels ring[2] as cluster, deletes the rest;
    # confirms one background candidate, rejects another; draws a new prototype
    new_proto = _set_class(json.loads(json.dumps(ring[0])), "ring")
    new_proto["id"] = "4b6c1f8e-0000-4000-8000-000000000001"
    new_proto["properties"] = {
        "objectType": "annotation",
        "classification": {"name": "ring", "color": [200, 40, 40]},
    }
    o = synthetic_slide.objects_of("ring")[-1]
    new_proto["geometry"]["coordinates"] = [
        [
            [o.x_l0, o.y_l0],
            [o.x_l0 + o.width_l0, o.y_l0],
            [o.x_l0 + o.width_l0, o.y_l0 + o.height_l0],
            [o.x_l0, o.y_l0 + o.height_l0],
            [o.x_l0, o.y_l0],
        ]
    ]
    reviewed = [
        ring[0],
        _set_class(ring[1], REJECTED_CLASS),
        _set_class(ring[2], "cluster"),
        bg[0],
        _set_class(bg[1], REJECTED_CLASS),
        new_proto,
    ]
    rev = tmp_path / "reviewed.geojson"
    rev.write_text(json.dumps({"type": "FeatureCollection", "features": reviewed}))
    assert (
        main(["review", image, "--annotations", str(rev), "--session", str(session_dir), "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    expected_approved = 1 if ring[0]["properties"]["measurements"]["similarity"] >= 0.4 else 0
    assert report["approved"] == expected_approved
    assert (report["rejected"], report["relabelled"]) == (1, 1)
    assert (report["background"], report["not_background"]) == (1, 1)
    assert report["new_prototypes"] == 1 and report["conflicts"] == []
    assert report["unreviewed"] == len(features) - 5
    session = Session.open(session_dir)
    negatives = session.examples("negative")
    assert [r.class_name for r in negatives] == ["ring"]  # a negative of the class it was for
    assert {r.class_name for r in session.examples("positive")} >= {"cluster"}
    assert session.reviewed_images == [str(synthetic_slide.path.resolve())]
    # re-ingesting the same review is idempotent
    before = json.loads((session_dir / SESSION_FILE).read_text())
    assert (
        main(["review", image, "--annotations", str(rev), "--session", str(session_dir), "--json"])
        == 0
    )
    again = json.loads(capsys.readouterr().out)
    assert again["unchanged"] == 4 + expected_approved and again["new_prototypes"] == 0
    after = json.loads((session_dir / SESSION_FILE).read_text())
    for key in ("prototypes", "decisions", "classes", "suggestions"):
        assert before[key] == after[key]
    # a review that contradicts an earlier one says so
    flip = tmp_path / "flip.geojson"
    flip.write_text(
        json.dumps({"type": "FeatureCollection", "features": [_set_class(ring[1], "ring")]})
    )
    assert main(["review", image, "--annotations", str(flip), "--session", str(session_dir)]) == 0
    out = capsys.readouterr().out
    assert "conflict with an earlier review" in out and "was negative" in out
    # background candidates avoid everything labelled
    bg_out = tmp_path / "bg.geojson"
    assert (
        main(
            [
                "background",
                image,
                "--session",
                str(session_dir),
                "--out",
                str(bg_out),
                "--n",
                "3",
                *engine_args,
            ]
        )
        == 0
    )
    validate_feature_collection(json.loads(bg_out.read_text()), image_size_l0=size)
    bg_feats = json.loads(bg_out.read_text())["features"]
    assert len(bg_feats) == 6
    assert {f["properties"]["classification"]["name"] for f in bg_feats} == {BACKGROUND_CLASS}
    # session show
    capsys.readouterr()
    assert main(["session", "show", str(session_dir), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["classes"]["ring"]["negatives"] == 0  # flipped back to positive
    assert shown["classes"]["ring"]["prototypes"] == 2
    assert shown["unreviewed_images"] == []


def test_mining_an_unreviewed_image_with_saved_prototypes(
    synthetic_slide: Any,
    tmp_path: Path,
    engine_args: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Noisy mining: suggest on another image with the session's prototypes, no annotations."""
    from simsearch_wsi.synthetic import make_synthetic_slide

    other = make_synthetic_slide(
        tmp_path / "other.tiff", width=1024, height=768, n_per_class=3, seed=7
    )
    session_dir = tmp_path / "s"
    assert (
        main(
            [
                "suggest",
                str(synthetic_slide.path),
                "--annotations",
                str(_protos(synthetic_slide, tmp_path / "p.geojson")),
                "--out",
                str(tmp_path / "a.geojson"),
                "--session",
                str(session_dir),
                *engine_args,
            ]
        )
        == 0
    )
    out = tmp_path / "mined.geojson"
    assert (
        main(
            [
                "suggest",
                str(other.path),
                "--session",
                str(session_dir),
                "--out",
                str(out),
                "--json",
                *engine_args,
            ]
        )
        == 0
    )
    capsys.readouterr()
    mined = json.loads(out.read_text())["features"]
    assert mined  # prototypes from the first slide find patches on the second
    summary = Session.open(session_dir).summary()
    assert str(other.path.resolve()) in summary["unreviewed_images"]


def test_session_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a review session"):
        Session.open(tmp_path)
    Session.create(tmp_path / "s")
    with pytest.raises(ConfigError, match="a session already exists"):
        Session.create(tmp_path / "s")
    data = json.loads((tmp_path / "s" / SESSION_FILE).read_text())
    data["version"] = 99
    (tmp_path / "s" / SESSION_FILE).write_text(json.dumps(data))
    with pytest.raises(MetadataError, match="session version 99 is not supported"):
        Session.open(tmp_path / "s")
    (tmp_path / "s" / SESSION_FILE).write_text("{broken")
    with pytest.raises(MetadataError, match="corrupt"):
        Session.open(tmp_path / "s")
    fresh = Session.create(tmp_path / "t")
    with pytest.raises(ConfigError, match="reserved"):
        from simsearch_wsi.core.geometry import BoxL0
        from simsearch_wsi.search.similarity import Prototype

        fresh.add_prototypes("x.tiff", [Prototype(REJECTED_CLASS, BoxL0(0, 0, 10, 10))])


def test_cli_session_errors(
    tmp_path: Path, synthetic_slide: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["session", "show", str(tmp_path)]) == 1
    assert "not a review session" in capsys.readouterr().err
    assert (
        main(
            [
                "suggest",
                str(synthetic_slide.path),
                "--out",
                str(tmp_path / "o.geojson"),
                "--weights",
                "random",
            ]
        )
        == 1
    )
    assert "needs --annotations" in capsys.readouterr().err


# --- issue 31: damaged session files and stray objects -------------------------------------------
@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda d: 42, "holds a JSON object, not a JSON int"),
        (lambda d: {**d, "version": "1"}, "session version '1' is not supported"),
        (
            lambda d: {**d, "classes": {"A": {"color": [1, 2, 3], "threshold": "high"}}},
            "classes['A'].threshold must be a finite number, got 'high' (str)",
        ),
        (
            lambda d: {**d, "classes": {"A": {"color": [1, 2, 3], "threshold": True}}},
            "classes['A'].threshold must be a finite number",
        ),
        (lambda d: {**d, "prototypes": {}}, "prototypes must be a list, got dict"),
        (
            lambda d: {**d, "prototypes": [{**d["prototypes"][0], "box": ["0", 0, 9, 9]}]},
            "prototypes[0].box[0] must be a finite number",
        ),
        (
            lambda d: {**d, "prototypes": [{**d["prototypes"][0], "class_name": "B"}]},
            "prototypes[0] has class 'B', which is not in classes",
        ),
        (
            lambda d: {**d, "decisions": [{"decision": "maybe", "record": {}}]},
            "decisions[0].decision must be one of positive, negative",
        ),
        (lambda d: {**d, "patch_size_l0": [0, 10]}, "patch_size_l0[0] must be a positive size"),
    ],
    ids=[
        "int",
        "version-text",
        "threshold-text",
        "threshold-bool",
        "prototypes-dict",
        "box-text",
        "unknown-class",
        "decision",
        "patch-size",
    ],
)
def test_a_damaged_session_file_fails_at_open_naming_it(
    tmp_path: Path, edit: Any, says: str
) -> None:
    """Issue 31: a session.json that is not an object, or holds a threshold as a string, gave
    a traceback later; now opening it fails with one line naming the file and the field."""
    from simsearch_wsi.core.geometry import BoxL0
    from simsearch_wsi.search.similarity import Prototype

    session = Session.create(tmp_path / "s")
    session.add_prototypes("x.tiff", [Prototype("A", BoxL0(0, 0, 10, 10))])
    session.save()
    file = tmp_path / "s" / SESSION_FILE
    file.write_text(json.dumps(edit(json.loads(file.read_text()))))
    with pytest.raises(MetadataError) as info:
        Session.open(tmp_path / "s")
    message = str(info.value)
    assert message.startswith(f"{file}: not a usable session file: ") and "\n" not in message
    assert says in message


def test_ingest_review_checks_every_new_prototype_before_changing_anything(
    tmp_path: Path, synthetic_slide: Any
) -> None:
    """Issue 31: a rectangle far outside the image became a prototype; later suggests failed
    without pointing at it. Now the review is refused and the session (in memory and on
    disk) is unchanged; a session damaged earlier names its stray prototype."""
    from simsearch_wsi.core.geometry import BoxL0
    from simsearch_wsi.io import open_image
    from simsearch_wsi.qupath.geojson import Annotation
    from simsearch_wsi.search.similarity import Prototype

    def rect(x: float, y: float, side: float, name: str) -> Annotation:
        return Annotation(name, BoxL0(x, y, side, side), True, "annotation")

    session = Session.create(tmp_path / "s")
    session.add_prototypes(synthetic_slide.path, [Prototype("A", BoxL0(10, 10, 40, 40))])
    session.save()
    file = tmp_path / "s" / SESSION_FILE
    saved, state = file.read_bytes(), session.to_dict()
    size = (synthetic_slide.width, synthetic_slide.height)
    for stray, says in (
        (rect(1e6, 1e6, 40, "A"), f"is not inside the image ({size[0]}x{size[1]})"),
        (rect(1e308, 0, 40, "A"), "at (1e+308, 0)"),
        (rect(5, 5, 0.5, "A"), "zero area"),
        (rect(5, 5, 40, BACKGROUND_CLASS), "is reserved"),
    ):
        with pytest.raises(ConfigError, match=re.escape(says)) as info:
            session.ingest_review(
                synthetic_slide.path,
                [rect(100, 100, 40, "B"), stray],
                source="r.geojson",
                image_size_l0=size,
            )
        assert str(info.value).startswith("r.geojson: prototype 1 ")
        assert len(str(info.value)) < 400
        assert session.to_dict() == state
    assert file.read_bytes() == saved
    # a stray prototype saved by an older version is named by the next suggest
    session.prototypes.append(
        dataclasses.replace(session.prototypes[0], id="proto-stray", box=(1e6, 1e6, 40, 40))
    )
    with (
        open_image(synthetic_slide.path) as img,
        pytest.raises(ConfigError, match=r"prototype proto-stray .* is not inside the image"),
    ):
        session.check_prototypes_on(img)
