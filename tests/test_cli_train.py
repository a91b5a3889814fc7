"""``simsearch-wsi train``: a bundle from a review session, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from simsearch_wsi.cli.main import main
from simsearch_wsi.features.precision import autocast_pays_off
from simsearch_wsi.train.bundle import load_bundle


def test_train_writes_a_bundle(
    tmp_path: Path,
    labelled_session: Any,
    small_slides: Any,
    tiny_training: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "model.zip"
    args = ["train", "--session", str(labelled_session.root), "--out", str(out)]
    args += ["--weights", "random", "--cache", str(tmp_path / "cache"), "--json"]
    args += ["--noisy-images", str(small_slides[2].path), "--strategy", "pos+selflearn"]
    assert main([*args, "--similarity-expert", "0.5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == str(out)
    bundle = load_bundle(out)
    assert bundle.classes == ("ring", "cluster", "stripes", "background")
    assert bundle.strategy == "pos+selflearn"
    assert bundle.provenance["noisy_images"] == [str(small_slides[2].path.resolve())]
    assert bundle.config["preset"] == "fast"
    assert bundle.config["similarity_expert"] == 0.5  # --similarity-expert reached the config
    # auto decides whether an ensemble is trained: where it did not, the expert weight was not
    # used, and the bundle and the notes say so (it is not silently dropped)
    selection = bundle.metrics["selection"]
    if selection.get("resolved", selection["asked"]) == "ensemble":
        assert bundle.partner is not None and bundle.partner.expert_share == 0.5
    else:
        assert selection["similarity_expert"] == "not used"
        assert bundle.partner is None
        assert any("similarity expert" in n and "not used" in n for n in bundle.metrics["notes"])


def test_similarity_expert_is_off_by_default_and_a_non_negative_weight(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pydantic import ValidationError

    from simsearch_wsi.cli.main import build_parser
    from simsearch_wsi.core.errors import ConfigError
    from simsearch_wsi.server.schemas import TrainJobRequest
    from simsearch_wsi.train.fit import TrainConfig

    assert TrainConfig.preset_config("fast").similarity_expert == 0.0
    parser = build_parser()
    assert parser.parse_args(["train", "--session", "s"]).similarity_expert == 0.0
    assert (
        parser.parse_args(
            ["train", "--session", "s", "--similarity-expert", "0.25"]
        ).similarity_expert
        == 0.25
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--session", "s", "--similarity-expert", "-1"])
    assert "--similarity-expert" in capsys.readouterr().err
    # a weight for a head input that has no ensemble would be silently ignored: refused
    for head_input in ("search", "trunk", "tuned-search"):
        with pytest.raises(ConfigError, match=r"--similarity-expert.*'ensemble'") as info:
            TrainConfig.preset_config("fast").replace(head_input=head_input, similarity_expert=0.5)
        assert "\n" not in str(info.value) and head_input in str(info.value)
        TrainConfig.preset_config("fast").replace(head_input=head_input)  # 0 (off) is fine
    for head_input in ("ensemble", "auto"):
        config = TrainConfig.preset_config("fast").replace(
            head_input=head_input, similarity_expert=0.5
        )
        assert config.similarity_expert == 0.5
    assert TrainJobRequest(session="/s").similarity_expert == 0.0
    assert TrainJobRequest(session="/s", similarity_expert=0.25).similarity_expert == 0.25
    with pytest.raises(ValidationError):
        TrainJobRequest(session="/s", similarity_expert=-0.1)


def test_train_default_output_and_text_summary(
    tmp_path: Path, labelled_session: Any, tiny_training: None, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--session", str(labelled_session.root), "--strategy", "pos"]
    assert main([*args, "--weights", "random", "--cache", str(tmp_path / "cache")]) == 0
    text = capsys.readouterr().out
    assert (labelled_session.root / "model.zip").is_file()
    assert "confidence thresholds" in text and "supcon" in text


def test_train_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--session", str(tmp_path), "--weights", "random"])
    err = capsys.readouterr().err
    assert code == 1 and "not a review session" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_train_refuses_a_folder_as_output(
    tmp_path: Path, labelled_session: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--session", str(labelled_session.root), "--out", str(tmp_path)]
    assert main([*args, "--weights", "random"]) == 1
    assert "is a folder" in capsys.readouterr().err


def _assert_finds_and_agrees(bundle: Any, model: Any, held_out: Any, maps: Any = None) -> None:
    """A search-head model finds at least half of the held-out slide's objects (random trunk
    weights: well above chance, objects cover ~2 % of the slide, not perfect), and its dense
    maps and per-patch probabilities agree at the object centres."""
    import numpy as np

    from simsearch_wsi.infer.dense import dense_class_maps, detect, predict_patches
    from simsearch_wsi.io import open_image
    from simsearch_wsi.train.patches import PatchSample, PatchSet

    if maps is None:
        with open_image(held_out.path) as image:
            maps = dense_class_maps(image, model)
    dets = detect(maps, dict.fromkeys(bundle.classes, 0.5))
    found = sum(
        any(d.class_name == o.class_name and o.box.contains_point(*d.box.center_l0) for d in dets)
        for o in held_out.objects
    )
    assert found >= len(held_out.objects) // 2, (found, len(held_out.objects))
    classes = bundle.classes
    key = str(held_out.path.resolve())
    samples = tuple(
        PatchSample(key, o.center_l0, classes.index(o.class_name)) for o in held_out.objects
    )
    per_patch = predict_patches(bundle, PatchSet(samples, classes), open_image=open_image)
    g, sc = maps.geometry, maps.scale
    for row, o in zip(per_patch, held_out.objects, strict=True):
        i, j = g.window_index(o.center_l0[0] / sc.downsample_x, o.center_l0[1] / sc.downsample_y)
        np.testing.assert_allclose(maps.probabilities[:, i, j], row, atol=0.02)


def test_train_search_head_then_predict_finds_the_objects(
    tmp_path: Path,
    labelled_session: Any,
    small_slides: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 27: ``--head-input search`` trains in seconds (no trunk training) and the bundle
    predicts through the search's own features: the dense maps and the per-patch probabilities
    agree, and the held-out slide's objects are found."""

    from simsearch_wsi.infer.dense import PatchModel

    out = tmp_path / "model.zip"
    cache = tmp_path / "cache"
    args = ["train", "--session", str(labelled_session.root), "--out", str(out), "--json"]
    args += ["--weights", "random", "--cache", str(cache), "--head-input", "search"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    bundle = load_bundle(out)
    assert bundle.head_input == "search" and bundle.feature_norm == "whiten"
    assert bundle.memory_vectors is not None and "supcon" not in bundle.metrics["stages"]
    assert bundle.metrics["selection"]["kept"] == "search", summary
    held_out = small_slides[1]
    model = PatchModel(bundle, cache_dir=cache)
    _assert_finds_and_agrees(bundle, model, held_out)


def test_tuned_search_head_reads_the_fine_tuned_trunk_and_never_the_search_cache(
    tmp_path: Path, labelled_session: Any, small_slides: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 27 ``--head-input tuned-search``: the paper's stages fine-tune the trunk, the search
    head is fitted on that trunk's window vectors, and the bundle keeps the fine-tuned trunk.
    Its feature maps are named after the fine-tuned weights, so a cache the search filled with
    its own trunk's maps is never read for it; dense and per-patch probabilities agree."""

    from simsearch_wsi.features.backbones import build_trunk
    from simsearch_wsi.infer.dense import PatchModel

    out = tmp_path / "model.zip"
    cache = tmp_path / "cache"
    args = ["train", "--session", str(labelled_session.root), "--out", str(out), "--json"]
    args += ["--weights", "random", "--cache", str(cache), "--head-input", "tuned-search"]
    assert main([*args, "--no-autocast"]) == 0
    capsys.readouterr()
    bundle = load_bundle(out)
    assert bundle.head_input == "search" and bundle.memory_vectors is not None
    # --no-autocast: the search and the training both in float32, on any CPU
    assert bundle.metrics["precision"] == "fp32"
    assert bundle.provenance["search_trunk"] == "fine-tuned"
    # the thresholds of the combined probability: the default rule, recorded
    record = bundle.metrics["thresholds"]
    assert record["rule"] == "held-out-f1" and record["values"] == pytest.approx(bundle.thresholds)
    assert "supcon" in bundle.metrics["stages"] and "tuned_search_head" in bundle.metrics["stages"]
    base, _, info = build_trunk("resnet18-l3", "random", seed=0)
    changed = [
        k
        for k, v in base.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, bundle.trunk_state[k])
    ]
    assert changed, "the bundle must hold the fine-tuned trunk, not the search's"
    model = PatchModel(bundle, cache_dir=cache)
    assert model.extractor.weights.identity != info.identity
    held_out = small_slides[1]
    _assert_finds_and_agrees(bundle, model, held_out)


def test_predict_with_a_search_head_uses_the_given_cache(
    tmp_path: Path, labelled_session: Any, small_slides: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """``predict --cache`` puts a search-head model's feature maps where the search keeps its
    own (so a slide the search embedded is not embedded again)."""
    import shutil

    cache = tmp_path / "cache"
    model = tmp_path / "m.zip"
    args = ["train", "--session", str(labelled_session.root), "--out", str(model)]
    assert (
        main([*args, "--weights", "random", "--cache", str(cache), "--head-input", "search"]) == 0
    )
    shutil.rmtree(cache)
    slide = str(small_slides[1].path)
    out = tmp_path / "pred"
    capsys.readouterr()
    assert (
        main(["predict", slide, "--model", str(model), "--out", str(out), "--cache", str(cache)])
        == 0
    )
    assert [p for p in cache.iterdir() if p.suffix == ".zarr"]
    assert any(out.iterdir())


def test_ensemble_keeps_both_search_heads_and_combines_their_maps(
    tmp_path: Path, labelled_session: Any, small_slides: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 27 ``--head-input ensemble``: the search head on the fine-tuned trunk, with the
    search head on the search's own trunk as its partner in the same bundle; the model's maps
    are the product of the two heads' maps, and ``predict`` runs it end to end."""
    import dataclasses

    import numpy as np

    from simsearch_wsi.features.backbones import build_trunk
    from simsearch_wsi.infer.dense import PatchModel, dense_class_maps
    from simsearch_wsi.io import open_image
    from simsearch_wsi.train.ensemble import combine_experts

    out = tmp_path / "model.zip"
    cache = tmp_path / "cache"
    args = ["train", "--session", str(labelled_session.root), "--out", str(out), "--json"]
    args += ["--weights", "random", "--cache", str(cache), "--head-input", "ensemble"]
    assert main(args) == 0
    capsys.readouterr()
    bundle = load_bundle(out)
    partner = bundle.partner
    assert partner is not None and bundle.metrics["selection"]["kept"] == "tuned-search+search"
    assert bundle.provenance["search_trunk"] == "fine-tuned"
    assert partner.provenance["search_trunk"] == "search" and partner.head_input == "search"
    # the fine-tuned trunk's linear head would be thrown away: it is not trained
    stages = bundle.metrics["stages"]
    assert {"supcon", "search_head", "tuned_search_head"} <= set(stages) and "linear" not in stages
    # the trunk that feeds search heads (their memory holds the 90-degree turns) is turned less
    assert bundle.metrics["rotate_deg"] == {"selflearn": 45.0, "supcon": 45.0}
    # without --no-autocast the training takes the CPU's precision path (bf16 where native)
    native = autocast_pays_off(torch.device("cpu"))
    assert bundle.metrics["precision"] == ("bf16" if native else "fp32")
    base, _, _ = build_trunk("resnet18-l3", "random", seed=0)
    for k, v in base.state_dict().items():  # the partner reads the search's trunk, unchanged
        assert torch.equal(v, partner.trunk_state[k]), k
    assert any(
        not torch.equal(v, bundle.trunk_state[k])
        for k, v in base.state_dict().items()
        if v.is_floating_point()
    )
    held_out = small_slides[1]
    model = PatchModel(bundle, cache_dir=cache)
    with open_image(held_out.path) as image:
        pair = dense_class_maps(image, model)
        alone = dense_class_maps(image, PatchModel(dataclasses.replace(bundle, partner=None)))
        other = dense_class_maps(image, PatchModel(partner, cache_dir=cache))
    expected = combine_experts([alone.probabilities, other.probabilities])
    np.testing.assert_allclose(pair.probabilities, expected, rtol=1e-6, equal_nan=True)
    # search heads, and their ensemble, rank detections against the background
    assert pair.rank_against_background and alone.rank_against_background
    assert other.rank_against_background
    assert not np.allclose(alone.probabilities, other.probabilities, equal_nan=True)
    _assert_finds_and_agrees(bundle, model, held_out, pair)
    pred = tmp_path / "pred"
    slide = str(held_out.path)
    assert (
        main(["predict", slide, "--model", str(out), "--out", str(pred), "--cache", str(cache)])
        == 0
    )
    assert any(pred.iterdir())
