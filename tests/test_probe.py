"""The search head (simsearch_wsi.search.probe) and what the loop keeps (issue 27)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from simsearch_wsi.infer.dense import class_log_odds, untrained_bundle
from simsearch_wsi.io import open_image
from simsearch_wsi.search.probe import MemoryHead, fit_memory_head, macro_average_precision
from simsearch_wsi.train.bundle import load_bundle, save_bundle
from simsearch_wsi.train.fit import SELECTION_MARGIN, _Candidate, _select
from simsearch_wsi.train.patches import PatchSample, PatchSet


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _clusters(seed: int = 0) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, torch.Tensor]:
    """Unit vectors (D = 16): class 0 around e0, background around e1, and a look-alike of
    class 0 around (e0 + 0.8 e2) that is not class 0."""
    gen = torch.Generator().manual_seed(seed)
    eye = torch.eye(16)
    pos = _unit(eye[0] + 0.15 * torch.randn(6, 16, generator=gen))
    bg = _unit(eye[1] + 0.15 * torch.randn(6, 16, generator=gen))
    look = _unit(eye[0] + 0.8 * eye[2] + 0.1 * torch.randn(4, 16, generator=gen))
    x = torch.cat([pos, bg])
    labels = np.array([0] * 6 + [1] * 6)
    probe_look = _unit(eye[0] + 0.8 * eye[2] + 0.1 * torch.randn(5, 16, generator=gen))
    return x, labels, look, probe_look


def test_flagged_look_alikes_push_the_class_away_from_them() -> None:
    x, labels, look, probe_look = _clusters()
    ids = np.arange(len(x))
    plain = fit_memory_head(x, labels, sample_ids=ids, n_classes=2, background=1)
    flagged = fit_memory_head(
        x,
        labels,
        sample_ids=ids,
        n_classes=2,
        background=1,
        negatives=look,
        negative_labels=np.zeros(len(look), dtype=np.int64),
        negative_ids=np.arange(len(look)),
    )
    p_plain = plain.probabilities(probe_look)[:, 0]
    p_flagged = flagged.probabilities(probe_look)[:, 0]
    assert (p_flagged < p_plain).all()
    # the class itself is still recognised
    fresh = _unit(torch.eye(16)[0] + 0.15 * torch.randn(5, 16, generator=torch.Generator()))
    assert (flagged.probabilities(fresh)[:, 0] > 0.5).all()


def test_without_labels_beyond_the_prototypes_the_head_ranks_like_the_search() -> None:
    """Before any counter-example matters, the class score is the cosine to the nearest
    positive: the ranking of the search."""
    x, labels, _, _ = _clusters(1)
    head = fit_memory_head(x, labels, sample_ids=np.arange(len(x)), n_classes=2, background=1)
    queries = _unit(torch.randn(50, 16, generator=torch.Generator().manual_seed(3)))
    pos, _ = head.similarities(queries)
    search_rank = np.argsort(-pos[:, 0].numpy())
    odds = head.logits(*head.similarities(queries))[:, 0].numpy()
    head_rank = np.argsort(-odds)
    # counter-examples get a small weight, so the orders agree almost everywhere
    assert len(set(search_rank[:10]) & set(head_rank[:15])) >= 8


def test_leave_one_out_calibration_does_not_see_a_patch_in_its_own_memory() -> None:
    x, labels, _, _ = _clusters(2)
    head = MemoryHead(x, torch.from_numpy(labels), torch.ones(2), torch.zeros(2), 1)
    same = torch.arange(len(x))
    pos_loo, _ = head.similarities(x, exclude=same[:, None] == same[None, :])
    pos_all, _ = head.similarities(x)
    assert torch.allclose(pos_all[:6, 0], torch.ones(6), atol=1e-5)
    assert (pos_loo[:6, 0] < 0.999).all()


def test_log_odds_keep_their_order_where_probabilities_round_to_one() -> None:
    logits = torch.tensor([[30.0, 40.0, 50.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    p = torch.softmax(logits, dim=0).numpy().astype(np.float32)[:, None, :]  # (K, 1, 3)
    assert (p[0] == 1.0).all()  # saturated in float32
    odds = class_log_odds(p, 0)[0]
    assert odds[0] < odds[1] < odds[2]


def test_selection_keeps_the_fine_tuned_model_only_when_it_wins_by_the_margin() -> None:
    classes = ("a", "background")
    val = PatchSet((), classes)
    labels = np.array([0, 0, 1, 1])
    good = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9]], np.float32)
    bad = np.array([[0.2, 0.8], [0.8, 0.2], [0.9, 0.1], [0.1, 0.9]], np.float32)

    def run(probe_p: np.ndarray, tuned_p: np.ndarray) -> tuple[str, dict[str, object]]:
        w = torch.zeros(2, 2)
        cands = [
            _Candidate("search", w, torch.zeros(2), probe_p),
            _Candidate("trunk", w, torch.zeros(2), tuned_p),
        ]
        metrics: dict[str, object] = {}
        val_labels = type("V", (), {"labels": labels})()
        chosen = _select(cands, val_labels, classes, "auto", metrics)  # type: ignore[arg-type]
        return chosen.head_input, metrics["selection"]  # type: ignore[return-value]

    def run3(probe_p: np.ndarray, trunk_p: np.ndarray, tuned_p: np.ndarray) -> str:
        w = torch.zeros(2, 2)
        cands = [
            _Candidate("search", w, torch.zeros(2), probe_p),
            _Candidate("trunk", w, torch.zeros(2), trunk_p),
            _Candidate("tuned-search", w, torch.zeros(2), tuned_p),
        ]
        metrics: dict[str, object] = {}
        val_labels = type("V", (), {"labels": labels})()
        chosen = _select(cands, val_labels, classes, "auto", metrics)  # type: ignore[arg-type]
        record = metrics["selection"]
        assert record["kept"] == chosen.kind  # type: ignore[index]
        assert chosen.head_input == ("trunk" if chosen.kind == "trunk" else "search")
        return chosen.kind

    # auto with the search head on the fine-tuned trunk as a third candidate: the best search
    # head is kept only where it beats the trunk's linear head by the margin
    assert run3(bad, bad, good) == "tuned-search"
    assert run3(good, bad, bad) == "search"
    assert run3(bad, good, good) == "trunk"
    assert val.classes == classes
    kept, record = run(good, bad)
    assert kept == "search" and "beat the fine-tuned" in str(record["reason"])
    kept, record = run(good, good)  # a tie goes to the fine-tuned trunk
    assert kept == "trunk" and record["margin"] == SELECTION_MARGIN
    kept, _ = run(bad, good)
    assert kept == "trunk"
    assert macro_average_precision(good, labels, classes=classes, skip="background") == 1.0


def test_search_head_bundle_round_trips(tmp_path: Path, synthetic_slide: Any) -> None:
    with open_image(synthetic_slide.path) as image:
        base = untrained_bundle([image], classes=("a", "background"))
    memory = _unit(torch.randn(6, base.feature_dim))
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    bundle = dataclasses.replace(
        base,
        head_weight=torch.tensor([[9.0, 0.2], [0.0, 0.0]]),
        head_bias=torch.tensor([-4.0, 0.0]),
        head_input="search",
        feature_norm="whiten",
        memory_vectors=memory.half(),
        memory_owner=owner,
    )
    back = load_bundle(save_bundle(tmp_path / "m.zip", bundle))
    assert back.head_input == "search" and back.feature_norm == "whiten"
    assert back.memory_vectors is not None and back.memory_owner is not None
    assert torch.equal(back.memory_vectors, memory.half())
    assert torch.equal(back.memory_owner, owner)
    assert back.feature_dim == base.feature_dim
    with pytest.raises(ValueError, match="memory_owner values"):
        dataclasses.replace(bundle, memory_owner=torch.tensor([0, 0, 1, 1, 2, 9]))


def test_auto_compares_three_heads_and_records_which_it_kept(
    tmp_path: Path, labelled_session: Any, small_slides: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` with held-out patches trains the search head on the search's trunk, the
    fine-tuned trunk's linear head and the search head on the fine-tuned trunk, scores all
    three on the held-out patches, and the bundle is the one the record names; without
    held-out patches it trains as ``trunk`` and says so."""
    from simsearch_wsi.features.backbones import build_trunk
    from simsearch_wsi.features.cache import FeatureCache
    from simsearch_wsi.features.extractor import FeatureExtractor
    from simsearch_wsi.review.data import train_session
    from simsearch_wsi.search.engine import SimSearch
    from simsearch_wsi.train.fit import TrainConfig

    trunk, spec, info = build_trunk("resnet18-l3", "random", seed=0)
    search = SimSearch(FeatureExtractor(trunk, spec, info), FeatureCache(tmp_path / "cache"))
    base = TrainConfig.preset_config("quick", strategy="pos")
    # one short supervised contrastive stage: this tests the selection, not the training
    quick = base.replace(
        head_input="auto",
        supcon=dataclasses.replace(base.supcon, epochs=1, max_steps_per_epoch=2),
        linear=dataclasses.replace(base.linear, epochs=5),
        linear_views=1,
    )
    # the session has 3 patches per class: half of them held out (2 per class); the heads are
    # compared among 24 unlabelled windows too (the judge, here allowed with 3 patches per
    # class), and the search heads calibrated on 24 others
    monkeypatch.setattr("simsearch_wsi.train.fit.JUDGE_MIN_PER_CLASS", 3)
    held = train_session(
        labelled_session,
        search,
        config=quick.replace(
            val_fraction=0.5, min_val_per_class=1, judge_windows=24, unlabelled_windows=24
        ),
        open_image=open_image,
        noisy_images=[small_slides[2].path],
        seed=0,
    ).bundle
    record = held.metrics["selection"]
    assert record["judge_windows"] == 24
    assert set(record["validation_ap"]) == {"search", "trunk", "tuned-search"}
    assert all(v is not None for v in record["validation_ap"].values())
    kept = record["kept"]
    assert held.head_input == ("trunk" if kept == "trunk" else "search")
    if kept != "trunk":
        assert held.provenance["search_trunk"] == (
            "fine-tuned" if kept == "tuned-search" else "search"
        )
    assert "tuned_search_head" in held.metrics["stages"]
    # too few patches to hold any out: the trunk's linear head, as ``trunk``, with a note
    plain = train_session(
        labelled_session,
        search,
        config=quick,
        open_image=open_image,
        noisy_images=[small_slides[2].path],
        seed=0,
    )
    assert plain.bundle.head_input == "trunk"
    assert "tuned_search_head" not in plain.bundle.metrics["stages"]
    assert any(n.startswith("auto: too few labelled patches") for n in plain.notes)
    selection = plain.bundle.metrics["selection"]
    assert (selection["asked"], selection["resolved"], selection["kept"]) == (
        "auto",
        "trunk",
        "trunk",
    )


def test_unlabelled_windows_calibrate_a_head_fitted_on_few_positives() -> None:
    """Three positives of a class, three background patches: alone, the leave-one-out fit puts
    the class bias where moderately similar windows already count as the class; windows drawn
    from the slide (mostly neither the class nor its look-alike) as unlabelled background move
    the bias so that those windows are background, while the class's own objects stay the
    class (issue 27)."""
    gen = torch.Generator().manual_seed(5)
    eye = torch.eye(16)
    pos = _unit(eye[0] + 0.1 * torch.randn(3, 16, generator=gen))
    # the confirmed background is unlike most of the slide (e.g. glass)
    bg = _unit(eye[3] + 0.1 * torch.randn(3, 16, generator=gen))
    x, labels = torch.cat([pos, bg]), np.array([0] * 3 + [1] * 3)
    # the slide: tissue that shares part of the class's direction, and true objects
    tissue = _unit(0.5 * eye[0] + eye[1] + 0.1 * torch.randn(300, 16, generator=gen))
    objects = _unit(eye[0] + 0.1 * torch.randn(20, 16, generator=gen))
    ids = np.arange(len(x))
    plain = fit_memory_head(x, labels, sample_ids=ids, n_classes=2, background=1)
    calibrated = fit_memory_head(
        x, labels, sample_ids=ids, n_classes=2, background=1, unlabelled=tissue[:200]
    )
    held_tissue, held_objects = tissue[200:], objects
    called_plain = (plain.probabilities(held_tissue)[:, 0] > 0.5).mean()
    called_cal = (calibrated.probabilities(held_tissue)[:, 0] > 0.5).mean()
    assert called_plain > 0.5  # the failure: most of the tissue called the class
    assert called_cal < 0.05
    assert (calibrated.probabilities(held_objects)[:, 0] > 0.5).mean() >= 0.95
    # the memory holds the labelled patches only
    assert len(calibrated.vectors) == len(x)
    with pytest.raises(Exception, match="unlabelled windows must be"):
        fit_memory_head(
            x, labels, sample_ids=ids, n_classes=2, background=1, unlabelled=tissue[:, :8]
        )


def test_the_judge_ranks_held_out_patches_among_unlabelled_windows() -> None:
    """``auto`` with a judge: a head that scores every held-out patch right but calls the
    slide's other windows its class loses to one that keeps them background, although both
    are perfect on the held-out patches alone."""
    classes = ("a", "background")
    labels = np.array([0, 0, 1, 1])
    held = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9]], np.float32)
    judge = PatchSet(
        tuple(
            PatchSample("slide.tiff", (float(10 * k), 5.0), 1, source="random") for k in range(6)
        ),
        classes,
    )
    eager = np.tile(np.array([[0.95, 0.05]], np.float32), (6, 1))  # everything is "a"
    sober = np.tile(np.array([[0.3, 0.7]], np.float32), (6, 1))
    w = torch.zeros(2, 2)
    cands = [
        _Candidate("search", w, torch.zeros(2), held, judge_probs=sober),
        _Candidate("trunk", w, torch.zeros(2), held, judge_probs=eager),
    ]
    metrics: dict[str, Any] = {}
    val = type("V", (), {"labels": labels})()
    chosen = _select(cands, val, classes, "auto", metrics, judge=judge)  # type: ignore[arg-type]
    assert chosen.kind == "search"
    record = metrics["selection"]
    assert record["judge_windows"] == 6
    assert record["validation_ap"]["search"] == 1.0 and record["validation_ap"]["trunk"] < 0.5
    # without the judge both are perfect and the tie goes to the fine-tuned trunk
    cands2 = [
        _Candidate("search", w, torch.zeros(2), held, judge_probs=sober),
        _Candidate("trunk", w, torch.zeros(2), held, judge_probs=eager),
    ]
    assert _select(cands2, val, classes, "auto", {}).kind == "trunk"  # type: ignore[arg-type]


def test_head_specs_name_the_training_variants_of_the_benchmarks() -> None:
    from simsearch_wsi.core.errors import ConfigError
    from simsearch_wsi.train.choices import parse_head_spec
    from simsearch_wsi.train.fit import TrainConfig

    assert parse_head_spec("trunk") == ("trunk", {})
    name, changes = parse_head_spec("auto:u256:j128")
    assert name == "auto" and changes == {"unlabelled_windows": 256, "judge_windows": 128}
    config = TrainConfig.preset_config("quick").replace(head_input=name, **changes)
    assert (config.unlabelled_windows, config.judge_windows) == (256, 128)
    for bad in ("auto:x5", "auto:u", "auto:u-3"):
        with pytest.raises(ConfigError, match="unknown suffix"):
            parse_head_spec(bad)


def test_auto_trains_the_ensemble_from_five_labels_per_class_on_brightfield() -> None:
    """``auto`` without a judge: the ensemble of the two search heads where every class has at
    least ``AUTO_ENSEMBLE_MIN_PER_CLASS`` labelled patches and the images are brightfield RGB;
    the fine-tuned trunk's linear head otherwise; a note says which and why."""
    from simsearch_wsi.train.fit import AUTO_ENSEMBLE_MIN_PER_CLASS, _auto_head_input

    view: Any = object()  # only its presence matters here
    enough = {"ring": 5, "cluster": 9, "background": 16}
    assert AUTO_ENSEMBLE_MIN_PER_CLASS == 5
    notes: list[str] = []
    assert _auto_head_input(enough, rgb=True, search=view, notes=notes) == "ensemble"
    assert "ensemble" in notes[-1]
    few = {**enough, "ring": 4}
    assert _auto_head_input(few, rgb=True, search=view, notes=notes) == "trunk"
    assert notes[-1].startswith("auto: too few labelled patches") and "4 in a class" in notes[-1]
    assert _auto_head_input(enough, rgb=False, search=view, notes=notes) == "trunk"
    assert "not brightfield RGB" in notes[-1]
    assert _auto_head_input(enough, rgb=True, search=None, notes=notes) == "trunk"
    assert "no similarity search" in notes[-1]
    # a class without patches (not in the session) does not count as "too few"
    assert (
        _auto_head_input({**enough, "stripes": 0}, rgb=True, search=view, notes=notes) == "ensemble"
    )


@pytest.mark.slow
def test_the_ensemble_picks_tail_thresholds_from_both_heads_evidence(
    tmp_path: Path, labelled_session: Any, small_slides: Any
) -> None:
    """``threshold_rule="tail"`` on the ensemble: the thresholds come from the two heads'
    combined leave-one-out probabilities of the labelled patches and their combined
    probabilities of the same unlabelled windows (the two views draw the same ones); the
    bundle records the rule and its inputs. Without a held-out split it still applies."""
    from simsearch_wsi.features.backbones import build_trunk
    from simsearch_wsi.features.cache import FeatureCache
    from simsearch_wsi.features.extractor import FeatureExtractor
    from simsearch_wsi.review.data import train_session
    from simsearch_wsi.search.engine import SimSearch
    from simsearch_wsi.train.fit import TAIL_MAX, TrainConfig, tail_thresholds

    trunk, spec, info = build_trunk("resnet18-l3", "random", seed=0)
    search = SimSearch(FeatureExtractor(trunk, spec, info), FeatureCache(tmp_path / "cache"))
    base = TrainConfig.preset_config("quick", strategy="pos")
    config = base.replace(
        head_input="ensemble",
        threshold_rule="tail",
        supcon=dataclasses.replace(base.supcon, epochs=1, max_steps_per_epoch=2),
        unlabelled_windows=24,
    )
    result = train_session(labelled_session, search, config=config, open_image=open_image, seed=0)
    evidence = result.evidence
    assert evidence is not None and evidence.unlabelled_probs is not None
    assert evidence.loo_probs is not None and evidence.loo_labels is not None
    assert evidence.unlabelled_probs.shape == (24, len(evidence.classes))
    assert len(evidence.loo_probs) == len(evidence.loo_labels) > 0
    record = result.bundle.metrics["thresholds"]
    assert record["rule"] == "tail" and record["asked"] == "tail"
    expected = tail_thresholds(evidence)
    assert set(expected) == {"ring", "cluster", "stripes"}
    for c, v in expected.items():
        assert result.bundle.thresholds[c] == v["threshold"] <= TAIL_MAX
        assert record["tail"][c]["positives"] == v["positives"] > 0
    assert any(n.startswith("confidence thresholds (tail rule)") for n in result.notes)


@pytest.mark.slow
def test_the_similarity_expert_is_a_third_expert_read_from_the_partners_prototypes(
    tmp_path: Path, labelled_session: Any, small_slides: Any
) -> None:
    """``similarity_expert > 0`` on the ensemble: the partner keeps the mask of its memory's
    prototype entries and the expert's logits (``s_c / T`` beside a background logit
    ``ceiling / T``); the model's maps are the weighted product of the two heads' maps and the
    expert's, the expert's own probabilities are the softmax of the search's similarity to the
    prototypes at that temperature; the bundle round-trips as version 4, and without the
    expert it is the two-head ensemble of the same training, bit for bit."""
    from simsearch_wsi.features.backbones import build_trunk
    from simsearch_wsi.features.cache import FeatureCache
    from simsearch_wsi.features.extractor import FeatureExtractor
    from simsearch_wsi.infer.dense import PatchModel, _search_class_maps, dense_class_maps
    from simsearch_wsi.review.data import train_session
    from simsearch_wsi.search.engine import SimSearch
    from simsearch_wsi.train.bundle import load_bundle, save_bundle
    from simsearch_wsi.train.ensemble import (
        SIMILARITY_EXPERT_CEILING,
        SIMILARITY_EXPERT_TEMPERATURE,
        combine_experts,
    )
    from simsearch_wsi.train.fit import TrainConfig

    trunk, spec, info = build_trunk("resnet18-l3", "random", seed=0)
    cache = tmp_path / "cache"
    search = SimSearch(FeatureExtractor(trunk, spec, info), FeatureCache(cache))
    base = TrainConfig.preset_config("quick", strategy="pos")
    config = base.replace(
        head_input="ensemble",
        similarity_expert=0.5,
        supcon=dataclasses.replace(base.supcon, epochs=1, max_steps_per_epoch=2),
        unlabelled_windows=24,
    )
    result = train_session(labelled_session, search, config=config, open_image=open_image, seed=0)
    bundle = result.bundle
    partner = bundle.partner
    assert partner is not None and partner.has_expert and partner.expert_share == 0.5
    assert partner.expert_mask is not None and partner.memory_owner is not None
    # the mask picks the prototypes' entries: one prototype per class, 4 rotations each
    n_classes = len(bundle.classes) - 1
    assert int(partner.expert_mask.sum()) == 4 * n_classes
    kept_owner = partner.memory_owner[partner.expert_mask]
    assert sorted(set(kept_owner.tolist())) == list(range(n_classes))
    assert result.evidence is not None and result.evidence.loo_probs is not None
    path = save_bundle(tmp_path / "model.zip", bundle)
    loaded = load_bundle(path)
    import json
    import zipfile

    with zipfile.ZipFile(path) as zf:
        assert json.loads(zf.read("bundle.json"))["version"] == 4
    assert loaded.partner is not None and loaded.partner.expert_share == 0.5
    assert loaded.partner.expert_mask is not None
    assert torch.equal(loaded.partner.expert_mask, partner.expert_mask)
    held_out = small_slides[1]
    model = PatchModel(loaded, cache_dir=cache)
    plain = dataclasses.replace(
        loaded,
        partner=dataclasses.replace(
            loaded.partner, expert_mask=None, expert_weight=None, expert_bias=None, expert_share=0.0
        ),
    )
    with open_image(held_out.path) as image:
        three = dense_class_maps(image, model)
        two = dense_class_maps(image, PatchModel(plain, cache_dir=cache))
        alone = dense_class_maps(image, PatchModel(dataclasses.replace(loaded, partner=None)))
        assert model.partner is not None
        other, expert = _search_class_maps(
            image, model.partner, tile_size=1024, batch_size=4, tiles="foreground", progress=None
        )
        sims = search.similarity(
            image, labelled_session.all_prototypes(), patch_size_l0=loaded.patch_size_l0
        )
    assert expert is not None
    np.testing.assert_array_equal(
        two.probabilities, combine_experts([alone.probabilities, other.probabilities])
    )
    expected = combine_experts(
        [alone.probabilities, other.probabilities, expert], weights=[1.0, 1.0, 0.5]
    )
    np.testing.assert_array_equal(three.probabilities, expected)
    assert not np.allclose(three.probabilities, two.probabilities, equal_nan=True)
    # the expert is the search's similarity at the temperature, beside the background's logit
    t, top = SIMILARITY_EXPERT_TEMPERATURE, SIMILARITY_EXPERT_CEILING
    order = [sims.classes.index(c) for c in loaded.classes if c != "background"]
    logits = np.concatenate([sims.maps[order] / t, np.full((1, *sims.maps.shape[1:]), top / t)])
    logits -= np.nanmax(logits, axis=0, keepdims=True)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
    assert loaded.classes[-1] == "background"
    valid = np.isfinite(expert).all(axis=0) & np.isfinite(softmax).all(axis=0)
    assert valid.mean() > 0.5
    # the search's maps are bf16 products of its own prototype embedding: close, not equal
    np.testing.assert_allclose(expert[:, valid], softmax[:, valid], atol=0.1)


class _FixedView:
    """A search view whose window vector of a patch is a fixed unit vector per patch centre
    (the same in every rotation)."""

    feature_norm = "whiten"

    def __init__(self, by_center: dict[tuple[float, float], torch.Tensor]) -> None:
        self.by_center = by_center

    def vectors(self, patches: PatchSet, rotations: int = 1) -> torch.Tensor:
        one = torch.stack([self.by_center[s.center_l0] for s in patches.samples])
        return one.expand(rotations, *one.shape).clone()


def test_the_similarity_experts_evidence_reads_every_prototype_but_the_scored_patch() -> None:
    """The thresholds' evidence of the similarity expert (held-out, leave-one-out, unlabelled
    probabilities) reads the user's prototypes as the saved expert does, all of them: a class
    whose only prototype the held-out split took keeps it (before, the expert there had no
    entry of that class and scored every window of it as background), and a patch is never
    compared with its own entries."""
    from simsearch_wsi.train.fit import MEMORY_ROTATIONS, _similarity_expert_evidence

    classes = ("a", "b", "background")
    e = torch.eye(6)
    near_a = torch.nn.functional.normalize(e[0] + 0.2 * e[5], dim=0)
    vec = {
        (0.0, 0.0): e[0],  # a's only prototype (held out)
        (1.0, 0.0): near_a,  # an a positive (held out, like the prototype)
        (2.0, 0.0): torch.nn.functional.normalize(e[0] + 0.5 * e[4], dim=0),  # a positive
        (3.0, 0.0): e[1],  # b's prototype
        (4.0, 0.0): e[2],  # b positive
        (5.0, 0.0): e[3],  # background
    }
    train = PatchSet(
        (
            PatchSample("s", (2.0, 0.0), 0, "positive"),
            PatchSample("s", (3.0, 0.0), 1, "prototype"),
            PatchSample("s", (4.0, 0.0), 1, "positive"),
            PatchSample("s", (5.0, 0.0), 2, "background"),
        ),
        classes,
    )
    val = PatchSet(
        (PatchSample("s", (0.0, 0.0), 0, "prototype"), PatchSample("s", (1.0, 0.0), 0, "positive")),
        classes,
    )
    view = _FixedView(vec)
    xs = view.vectors(train, MEMORY_ROTATIONS).reshape(-1, 6)
    owner = torch.tensor(np.tile(train.labels, MEMORY_ROTATIONS))
    memory = MemoryHead(xs, owner, torch.ones(3), torch.zeros(3), 2, torch.zeros(3))
    unlabelled = torch.stack([near_a, e[3]])
    val_probs, unl_probs, loo = _similarity_expert_evidence(
        memory, view, train, val, unlabelled=unlabelled
    )
    assert val_probs is not None and unl_probs is not None
    # the held-out a positive and the unlabelled window next to a's prototype (cosine 0.98):
    # class a about as likely as the background (at the ceiling's cosine 1 they would tie);
    # without a's prototype it was e^-20 against the background
    assert val_probs[1, 0] > 0.4 and unl_probs[0, 0] > 0.4
    assert val_probs[1, 1] < 1e-3 and unl_probs[1, 2] > 0.99
    # the held-out prototype is not compared with itself (a has no other prototype)
    assert val_probs[0, 0] < 0.01
    # leave-one-out: b's only prototype is not compared with itself either; the a positive
    # of the training part is compared with a's (held-out) prototype
    assert loo.shape == (4, 3) and loo[1, 1] < 0.01 and loo[0, 0] > 0.2
    np.testing.assert_allclose(val_probs.sum(axis=1), 1.0, rtol=1e-5)
