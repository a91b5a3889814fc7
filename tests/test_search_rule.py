"""The object rule is the default search (issue 18): ``SearchSettings.dense``, the
``--dense/--no-dense`` engine option of every command that builds a search, the server's
``dense`` request field, and a review session's recorded rule (old session files keep the
patch rule their suggestions were made with)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from simsearch_wsi.cli.engine import build_search
from simsearch_wsi.cli.main import build_parser, main
from simsearch_wsi.core.errors import MetadataError
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.io import open_image
from simsearch_wsi.review.session import SESSION_FILE, Session, suggest_with_session
from simsearch_wsi.search.engine import SearchSettings, SimSearch
from simsearch_wsi.server.schemas import BackgroundRequest, SuggestRequest
from simsearch_wsi.synthetic.dense import make_dense_field

CLS = "nucleus"


@pytest.fixture(scope="module")
def field(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("rule")
    return make_dense_field(root / "f.tiff", width=128, height=128, spacing=1.0, seed=5)


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> SimSearch:
    trunk, spec, info = build_trunk("resnet18-l3", "embedded", seed=0)
    extractor = FeatureExtractor(trunk, spec, info, device=torch.device("cpu"), autocast=False)
    return SimSearch(extractor, FeatureCache(tmp_path_factory.mktemp("cache")))


def test_object_rule_is_the_default(search: SimSearch) -> None:
    assert SearchSettings().dense is True
    assert search.settings.dense is True
    patch = search.with_settings(dense=False)
    assert patch.settings.dense is False and search.settings.dense is True
    # the same trunk, cache and fitted normalisations; unchanged settings: the same search
    assert patch.extractor is search.extractor and patch.cache is search.cache
    assert patch._normalizations is search._normalizations
    assert search.with_settings(dense=True) is search


@pytest.mark.parametrize("command", ["suggest", "background", "train", "serve", "demo", "evaluate"])
def test_every_search_command_takes_the_rule(command: str) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    options = {o for a in sub.choices[command]._actions for o in a.option_strings}  # type: ignore[union-attr]
    assert {"--dense", "--no-dense"} <= options


def test_cli_rule_reaches_the_settings(tmp_path: Path) -> None:
    parser = build_parser()
    common = ["--weights", "embedded", "--device", "cpu", "--cache", str(tmp_path)]
    for flags, expected in (([], True), (["--dense"], True), (["--no-dense"], False)):
        args = parser.parse_args(["serve", *common, *flags])
        assert args.dense == (None if not flags else expected)
        assert build_search(args).settings.dense is expected


def test_dense_fine_refuses_the_patch_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o.geojson"
    argv = ["suggest", str(tmp_path / "x.tiff"), "--session", str(tmp_path / "s"), "--out"]
    assert main([*argv, str(out), "--dense-fine", "--no-dense"]) != 0
    err = capsys.readouterr().err
    assert "--dense-fine" in err and "--no-dense" in err and err.count("\n") == 1
    assert not out.exists() and not (tmp_path / "s").exists()


def test_server_requests_take_the_rule() -> None:
    assert SuggestRequest(image="/x.tiff").dense is None
    assert SuggestRequest(image="/x.tiff", dense=False).dense is False
    assert BackgroundRequest(image="/x.tiff", session="/s", dense=True).dense is True
    with pytest.raises(ValueError, match="dense"):
        SuggestRequest(image="/x.tiff", dense="patch")  # type: ignore[arg-type]


@pytest.mark.slow
def test_session_keeps_its_rule(field: Any, search: SimSearch, tmp_path: Path) -> None:
    root = tmp_path / "s"
    session = Session.create(root)
    assert session.dense is None  # no suggestions yet: the search's rule
    with open_image(field.path) as img:
        session.add_prototypes(img.path, [_proto(field, k) for k in range(3)])
        session.save()

        def run(dense: bool | None = None) -> Any:
            opened = Session.open(root)
            result = suggest_with_session(
                search,
                img,
                session=opened,
                annotations=None,
                where="test",
                thresholds={CLS: -1.0},
                dense=dense,
            )
            return result, Session.open(root)

        first, after = run()
        assert first.object_size_l0 is not None and after.dense is True
        assert json.loads((root / SESSION_FILE).read_text())["dense"] is True
        # a session file from before the rule was recorded, with suggestions: the patch rule
        doc = json.loads((root / SESSION_FILE).read_text())
        del doc["dense"]
        (root / SESSION_FILE).write_text(json.dumps(doc))
        assert Session.open(root).dense is False
        old, after = run()
        assert old.object_size_l0 is None and after.dense is False
        # asked for: the object rule again, recorded
        asked, after = run(dense=True)
        assert asked.object_size_l0 is not None and after.dense is True
        assert [(s.box, s.similarity) for s in asked.suggestions] == [
            (s.box, s.similarity) for s in first.suggestions
        ]
        assert len(asked.suggestions) > len(old.suggestions)  # touching nuclei


def test_session_refuses_a_bad_rule(tmp_path: Path) -> None:
    root = tmp_path / "s"
    Session.create(root)
    doc = json.loads((root / SESSION_FILE).read_text())
    for bad in (1, "yes"):
        doc["dense"] = bad
        (root / SESSION_FILE).write_text(json.dumps(doc))
        with pytest.raises(MetadataError, match="dense must be true, false or null"):
            Session.open(root)


def _proto(field: Any, k: int) -> Any:
    from simsearch_wsi.search.similarity import Prototype

    return Prototype(CLS, field.objects[k].box)
