"""Training (issue 5): patch datasets, the patch encoder, staged training and its strategies."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import (
    AnalysisScale,
    FeatureExtractor,
    embed_region,
    make_feature_spec,
    read_analysis_region,
)
from simsearch_wsi.features.precision import autocast_pays_off
from simsearch_wsi.features.preprocess import fit_normalization
from simsearch_wsi.infer.dense import predict_patches
from simsearch_wsi.io import open_image
from simsearch_wsi.review.data import collect_training_data, train_session
from simsearch_wsi.search.engine import SimSearch
from simsearch_wsi.search.probe import MEMORY_ROTATIONS, fit_memory_head
from simsearch_wsi.search.similarity import PatchGeometry
from simsearch_wsi.train.fit import (
    StageConfig,
    ThresholdEvidence,
    TrainConfig,
    _leave_one_out_probs,
    _train_linear,
    classification_metrics,
    not_class_loss,
    pick_thresholds,
    tail_thresholds,
)
from simsearch_wsi.train.model import PatchEncoder, set_trainable, train_mode
from simsearch_wsi.train.patches import (
    CropGeometry,
    PatchReader,
    PatchSample,
    PatchSet,
    stratified_split,
)

STRATEGIES = ("pos", "pos+neg", "pos+selflearn", "pos+neg+selflearn")


def tiny_config(strategy: str = "pos+neg+selflearn", **changes: Any) -> TrainConfig:
    """A few seconds of training on 2 CPU cores."""
    cfg = TrainConfig.preset_config("fast", strategy=strategy).replace(
        selflearn=StageConfig(4, 32, 1e-3, temperature=0.5, max_steps_per_epoch=3),
        supcon=StageConfig(8, 24, 1e-3, temperature=0.07, max_steps_per_epoch=2),
        noisy_per_class=16,
        background_per_image=16,
        linear_views=4,
        head_input="trunk",  # the paper's stages (the search head: tests/test_probe.py)
    )
    return cfg.replace(**changes)


_CACHE: dict[str, Path] = {}


def _search(tmp_path: Path, weights: str | Path = "random") -> SimSearch:
    """A search with its own trunk; features are cached in one folder per test module (entries
    are keyed by weights, so sharing is safe and saves re-embedding)."""
    cache = _CACHE.setdefault("dir", tmp_path / "cache")
    trunk, spec, info = build_trunk("resnet18-l3", weights, seed=0)
    return SimSearch(FeatureExtractor(trunk, spec, info), FeatureCache(cache))


def _open(path: str) -> Any:
    return open_image(path)


# --- patch sets -------------------------------------------------------------------------------
def _set(counts: dict[str, int]) -> PatchSet:
    classes = tuple(counts)
    samples = [
        PatchSample("img", (float(i), 0.0), k)
        for k, c in enumerate(classes)
        for i in range(counts[c])
    ]
    return PatchSet(tuple(samples), classes)


def test_weighted_oversampling_draws_every_class_equally() -> None:
    patches = _set({"rare": 3, "common": 60, "mid": 12})
    w = patches.sampling_weights()
    per_class = [w[patches.labels == k].sum() for k in range(3)]
    np.testing.assert_allclose(per_class, [1 / 3] * 3)
    drawn = patches.labels[patches.draw(30_000, np.random.default_rng(0))]
    np.testing.assert_allclose(np.bincount(drawn) / drawn.size, [1 / 3] * 3, atol=0.015)


def test_draw_is_seeded() -> None:
    patches = _set({"a": 5, "b": 9})
    one = patches.draw(50, np.random.default_rng(3))
    two = patches.draw(50, np.random.default_rng(3))
    assert np.array_equal(one, two)
    assert not np.array_equal(one, patches.draw(50, np.random.default_rng(4)))


def test_patch_labels_must_index_classes() -> None:
    with pytest.raises(ConfigError, match="outside"):
        PatchSet((PatchSample("img", (0, 0), 2),), ("a", "b"))


def test_stratified_split_holds_out_each_class() -> None:
    patches = _set({"a": 10, "b": 20})
    split = stratified_split(patches, 0.2, rng=np.random.default_rng(0), min_per_class=2)
    assert split is not None
    train, val = split
    assert val.class_counts() == {"a": 2, "b": 4}
    assert train.class_counts() == {"a": 8, "b": 16}
    keys = {(*s.center_l0, s.label) for s in train.samples}
    assert not keys & {(*s.center_l0, s.label) for s in val.samples}
    assert stratified_split(patches, 0.1, rng=np.random.default_rng(0), min_per_class=2) is None


def test_reader_crops_match_a_direct_read(small_slides: Any) -> None:
    slide = small_slides[0]
    with open_image(slide.path) as image:
        norm = fit_normalization([image])
        scale = AnalysisScale.for_patch(image, 48)
        obj = slide.objects[0]
        crop = CropGeometry(48, 64, 32, max_jitter_a=8)
        with PatchReader(crop, norm, channels=image.channel_names, open_image=_open) as reader:
            sample = PatchSample(str(slide.path), obj.center_l0, 0)
            x = reader.read([sample])
            assert x.shape == (1, 3, 128, 128) and x.dtype == torch.float32
            # crops are cut from grid-aligned reads (origins at multiples of 16 analysis px)
            cx, cy = obj.center_l0[0] / scale.downsample_x, obj.center_l0[1] / scale.downsample_y
            x0, y0 = round(cx - 64), round(cy - 64)
            ax, ay = ((x0 - 8) // 16) * 16, ((y0 - 8) // 16) * 16
            big = norm.apply(read_analysis_region(image, scale, ax, ay, 176, 176))

            def at(dx: int, dy: int) -> np.ndarray:
                x, y = x0 + dx - ax, y0 + dy - ay
                return big[y : y + 128, x : x + 128].transpose(2, 0, 1)

            np.testing.assert_allclose(x[0].numpy(), at(0, 0), atol=1e-6)
            # jittered crops are shifted copies of the same cached read, within the margin
            shifted = reader.read([sample] * 8, rng=np.random.default_rng(0))
            assert float((shifted - x).abs().amax(dim=(1, 2, 3)).max()) > 0
            shifts = [(dx, dy) for dy in range(-8, 9) for dx in range(-8, 9)]
            for k in range(8):
                assert any(
                    np.allclose(shifted[k].numpy(), at(dx, dy), atol=1e-6) for dx, dy in shifts
                )


# --- the encoder ------------------------------------------------------------------------------
def test_encoder_with_full_context_equals_dense_features(small_slides: Any) -> None:
    """A crop read with the trunk's halo as context pools to the dense map's window vector:
    training and dense inference see the same thing."""
    slide = small_slides[0]
    trunk, spec, info = build_trunk("resnet18-l3", "random", seed=1)
    extractor = FeatureExtractor(trunk, spec, info, autocast=False)
    with open_image(slide.path) as image:
        norm = fit_normalization([image])
        scale = AnalysisScale.for_patch(image, 48)
        geometry = PatchGeometry.from_l0(48, 48, scale=scale, stride=16)
        fspec = make_feature_spec(image, extractor, scale=scale, normalization=norm, tile_size=256)
        kh, kw = geometry.kernel_hw
        encoder = PatchEncoder(trunk, spec, geometry=geometry, rgb=True, context_a=spec.halo).eval()
        i, j = 20, 31  # window's top-left feature cell
        dense = embed_region(image, extractor, fspec, 16 * j, 16 * i, 16 * kw, 16 * kh)
        expected = (dense * geometry.kernel()).sum(dim=(-2, -1))
        side = encoder.crop_side_a
        raw = read_analysis_region(image, scale, 16 * j - spec.halo, 16 * i - spec.halo, side, side)
        x = torch.from_numpy(norm.apply(raw).transpose(2, 0, 1).copy())[None]
        with torch.no_grad():
            got = encoder(x)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_pretrained_trunks_freeze_conv1_and_two_blocks() -> None:
    trunk, _, _ = build_trunk("resnet18-l3", "random", seed=0)
    params = set_trainable(trunk, freeze_early=True)
    trainable = {n for n, p in trunk.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("layer3") for n in trainable)
    assert len(params) == len(trainable)
    train_mode(trunk, freeze_early=True)
    assert not trunk.bn1.training and not trunk.layer2.training and trunk.layer3.training
    set_trainable(trunk, freeze_early=False)
    assert all(p.requires_grad for p in trunk.parameters())


def test_encoder_rejects_wrong_crop_size() -> None:
    trunk, spec, _ = build_trunk("resnet18-l3", "random", seed=0)
    enc = PatchEncoder(trunk, spec, geometry=PatchGeometry(64, 64, 16), rgb=True, context_a=32)
    with pytest.raises(ConfigError, match="128x128"):
        enc(torch.zeros(1, 3, 96, 96))
    with pytest.raises(ConfigError, match="multiple"):
        PatchEncoder(trunk, spec, geometry=PatchGeometry(64, 64, 16), rgb=True, context_a=20)


# --- metrics ----------------------------------------------------------------------------------
def test_classification_metrics_and_thresholds() -> None:
    probs = np.array(
        [[0.9, 0.1], [0.6, 0.4], [0.55, 0.45], [0.2, 0.8], [0.3, 0.7]], dtype=np.float32
    )
    labels = np.array([0, 0, 1, 1, 1])
    m = classification_metrics(probs, labels, classes=("a", "b"))
    assert m["accuracy"] == 0.8
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 2 / 3) / 2, abs=1e-4)
    assert m["confusion"] == [[2, 0], [1, 2]]
    assert m["per_class"]["a"]["precision"] == pytest.approx(2 / 3, abs=1e-4)
    thr = pick_thresholds(probs, labels, classes=("a", "b"))
    # class a is perfect once the 0.55 window is cut: threshold in (0.55, 0.6]
    assert 0.55 < thr["a"] <= 0.6
    assert thr["b"] <= 0.7


def test_tail_thresholds_sit_below_weak_positives_and_above_the_background() -> None:
    """The ``tail`` rule on synthetic probabilities: a class whose few labelled positives have
    modest probabilities (0.3-0.45) and many background-like unlabelled windows gets a
    threshold below most of its positives and above all but the top 2 % of the background; a
    confidently labelled class is capped at 0.5; a class without positives is left out."""
    rng = np.random.default_rng(0)
    classes = ("weak", "sure", "absent", "background")

    def rows(p_class: Any, k: int) -> Any:
        """(N, 4) probabilities: ``p_class`` on class ``k``, the rest on background."""
        out = np.zeros((len(p_class), 4), np.float32)
        out[:, k] = p_class
        out[:, 3] = 1 - np.asarray(p_class)
        return out

    val = np.concatenate([rows([0.38, 0.42], 0), rows([0.97], 1), rows([0.01, 0.02], 1)])
    val_labels = np.array([0, 0, 1, 3, 3])
    loo = np.concatenate([rows(rng.uniform(0.3, 0.45, 6), 0), rows(rng.uniform(0.9, 1, 5), 1)])
    loo_labels = np.array([0] * 6 + [1] * 5)
    # 500 windows: most background-like (the weak class at most 0.1), a few true positives
    unl = np.concatenate([rows(rng.uniform(0, 0.1, 490), 0), rows(rng.uniform(0.3, 0.5, 10), 0)])
    evidence = ThresholdEvidence(classes, val, val_labels, unl, loo, loo_labels)
    tail = tail_thresholds(evidence)
    assert set(tail) == {"weak", "sure"}
    weak = tail["weak"]
    positives = np.concatenate([[0.38, 0.42], loo[:6, 0]])
    assert weak["positives"] == 8
    assert weak["threshold"] < np.quantile(positives, 0.5)
    assert weak["threshold"] > np.quantile(unl[:, 0], 0.98) - 1e-6
    # the former rule on the same held-out patches: background is their most probable class, no
    # threshold finds them, it falls back to 0.5, above every positive
    assert pick_thresholds(val, val_labels, classes=classes)["weak"] == 0.5 > positives.max()
    assert tail["sure"]["threshold"] == 0.5
    # no unlabelled windows: no tail thresholds (the former rule applies)
    bare = ThresholdEvidence(classes, val, val_labels, None, loo, loo_labels)
    assert tail_thresholds(bare) == {}


def test_leave_one_out_probabilities_score_a_patch_without_its_memory_entries() -> None:
    """A search head's leave-one-out probabilities of its labelled patches equal those of the
    same head whose memory lacks the patch's four rotations."""
    gen = torch.Generator().manual_seed(0)
    n, d = 6, 8
    x = torch.nn.functional.normalize(torch.randn(MEMORY_ROTATIONS, n, d, generator=gen), dim=-1)
    labels = np.array([0, 0, 1, 1, 2, 2])
    head = fit_memory_head(
        x.reshape(-1, d),
        np.tile(labels, MEMORY_ROTATIONS),
        sample_ids=np.tile(np.arange(n), MEMORY_ROTATIONS),
        n_classes=3,
        background=2,
    )
    loo = _leave_one_out_probs(head, n)
    assert loo.shape == (n, 3)
    for i in range(n):
        keep = torch.arange(len(head.vectors)) % n != i
        without = dataclasses.replace(head, vectors=head.vectors[keep], owner=head.owner[keep])
        np.testing.assert_allclose(loo[i], without.probabilities(x[0, i : i + 1])[0], atol=1e-6)
    # with its own entries a class's patch is its own nearest neighbour: more confident
    fg = np.flatnonzero(labels != 2)
    assert (head.probabilities(x[0])[fg, labels[fg]] > loo[fg, labels[fg]]).all()


# --- training on a session --------------------------------------------------------------------
def test_training_data_from_a_session(
    tmp_path: Path, labelled_session: Any, small_slides: Any
) -> None:
    search = _search(tmp_path)
    unreviewed = small_slides[2].path
    data = collect_training_data(
        labelled_session, search, config=tiny_config(), open_image=_open, noisy_images=[unreviewed]
    )
    assert data.clean.classes == ("ring", "cluster", "stripes", "background")
    counts = data.clean.class_counts()
    assert [counts[c] for c in ("ring", "cluster", "stripes")] == [3, 3, 3]
    sources = {s.source for s in data.clean.samples if s.label == 3}
    assert sources == {"background"}  # 3 confirmed >= 3 positives per class: nothing mined
    assert data.negatives.class_counts() == {"ring": 1, "cluster": 1, "stripes": 1, "background": 0}
    noisy_images = {s.image for s in data.noisy.samples}
    assert noisy_images == {str(unreviewed.resolve())}
    assert data.noisy.class_counts()["background"] == 16
    # mined noisy positives are noisy (random weights) but far above chance: motifs of one class
    # cover about 2 % of the slide
    truth = small_slides[2]
    hits = 0
    positives = [s for s in data.noisy.samples if s.source == "noisy"]
    assert positives
    for s in positives:
        name = data.noisy.classes[s.label]
        hits += any(o.box.contains_point(*s.center_l0) for o in truth.objects_of(name))
    assert hits / len(positives) > 0.3
    assert data.rgb and data.channels == ("R", "G", "B") and data.mpp == pytest.approx(0.5)


def test_background_is_mined_when_few_were_confirmed(tmp_path: Path, labelled_session: Any) -> None:
    for rid, (decision, _) in list(labelled_session.decisions.items()):
        if decision == "background":
            del labelled_session.decisions[rid]
    data = collect_training_data(
        labelled_session, _search(tmp_path), config=tiny_config("pos"), open_image=_open
    )
    bg = [s for s in data.clean.samples if s.label == 3]
    assert len(bg) == 16 and {s.source for s in bg} == {"mined-background"}
    assert any("background was completed" in n for n in data.notes)
    assert len(data.noisy) == 0  # no self-learning in "pos"


def test_selflearn_without_unreviewed_images_mines_the_reviewed_ones(
    tmp_path: Path, labelled_session: Any
) -> None:
    data = collect_training_data(
        labelled_session, _search(tmp_path), config=tiny_config(), open_image=_open
    )
    assert len(data.noisy) > 0
    assert any("every session image was reviewed" in n for n in data.notes)
    labelled = labelled_session.labelled_boxes(labelled_session.prototypes[0].image)
    for s in data.noisy.samples:
        assert not any(b.contains_point(*s.center_l0) for b in labelled)


def _heldout(slide: Any, classes: tuple[str, ...]) -> PatchSet:
    index = {c: k for k, c in enumerate(classes)}
    key = str(slide.path.resolve())
    samples = [PatchSample(key, o.center_l0, index[o.class_name]) for o in slide.objects]
    samples += [
        PatchSample(key, b.center_l0, index["background"])
        for b in slide.background_boxes(12, seed=5)
    ]
    return PatchSet(tuple(samples), classes)


def _heldout_scores(bundle: Any, slide: Any) -> tuple[float, float]:
    patches = _heldout(slide, bundle.classes)
    probs = predict_patches(bundle, patches, open_image=_open)
    m = classification_metrics(probs, patches.labels, classes=patches.classes)
    true_p = probs[np.arange(len(patches)), patches.labels]
    return float(m["balanced_accuracy"]), float(-np.log(true_p + 1e-9).mean())


@pytest.fixture(scope="module")
def untrained(
    tmp_path_factory: pytest.TempPathFactory, make_labelled_session: Any, small_slides: Any
) -> tuple[float, float]:
    """Held-out scores of the untrained trunk with only the linear head fitted."""
    root = tmp_path_factory.mktemp("untrained")
    baseline = train_session(
        make_labelled_session(root / "session"),
        _search(root),
        config=tiny_config("pos", supcon=StageConfig(0, 24, 1e-3, temperature=0.07)),
        open_image=_open,
    )
    assert set(baseline.metrics["stages"]) == {"supcon", "linear"}
    assert baseline.metrics["stages"]["supcon"]["loss"] == []
    return _heldout_scores(baseline.bundle, small_slides[1])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_beats_the_untrained_trunk_on_a_held_out_slide(
    tmp_path: Path,
    labelled_session: Any,
    small_slides: Any,
    untrained: tuple[float, float],
    strategy: str,
) -> None:
    search = _search(tmp_path)
    unreviewed = [small_slides[2].path]
    base_acc, base_ce = untrained
    result = train_session(
        labelled_session,
        search,
        config=tiny_config(strategy),
        open_image=_open,
        noisy_images=unreviewed,
    )
    stages = result.metrics["stages"]
    assert ("selflearn" in stages) == ("selflearn" in strategy)
    assert stages["supcon"]["loss"][-1] < stages["supcon"]["loss"][0]
    acc, ce = _heldout_scores(result.bundle, small_slides[1])
    assert acc > base_acc, (strategy, acc, base_acc)
    assert ce < base_ce, (strategy, ce, base_ce)
    assert any("random" in n for n in result.notes)
    assert result.bundle.strategy == strategy
    assert result.bundle.classes == ("ring", "cluster", "stripes", "background")


def test_a_trunk_that_feeds_search_heads_is_turned_at_most_45_degrees() -> None:
    """Issue 27: search heads hold every labelled patch in 4 rotations 90 degrees apart, so the
    contrastive stages that fine-tune their trunk turn patches by at most
    ``search_head_rotate_deg`` (45); the linear head's trunk keeps the augmentations' 180."""
    from simsearch_wsi.train.fit import SEARCH_HEAD_ROTATE_DEG

    cfg = TrainConfig.preset_config("quick")
    assert cfg.noisy_augment.rotate_deg == cfg.clean_augment.rotate_deg == 180.0
    noisy, clean = cfg.stage_augments(search_heads=True)
    assert noisy.rotate_deg == clean.rotate_deg == SEARCH_HEAD_ROTATE_DEG == 45.0
    # nothing else changes
    assert dataclasses.replace(noisy, rotate_deg=180.0) == cfg.noisy_augment
    assert dataclasses.replace(clean, rotate_deg=180.0) == cfg.clean_augment
    assert cfg.stage_augments(search_heads=False) == (cfg.noisy_augment, cfg.clean_augment)
    off = cfg.replace(search_head_rotate_deg=None)
    assert off.stage_augments(search_heads=True) == (cfg.noisy_augment, cfg.clean_augment)
    # a smaller range asked of the augmentations themselves is kept
    narrow = cfg.replace(clean_augment=dataclasses.replace(cfg.clean_augment, rotate_deg=10.0))
    assert narrow.stage_augments(search_heads=True)[1].rotate_deg == 10.0
    assert "search_head_rotate_deg" in cfg.to_dict()
    for bad in (-1.0, 181, float("nan"), True, "45"):
        with pytest.raises(ConfigError, match="search_head_rotate_deg"):
            cfg.replace(search_head_rotate_deg=bad)


@pytest.mark.parametrize(
    "precision",
    [
        "fp32",
        pytest.param(
            "bf16",
            marks=pytest.mark.skipif(
                not autocast_pays_off(torch.device("cpu")),
                reason="this CPU has no native bf16 (AVX512-BF16/AMX): training runs in fp32",
            ),
        ),
    ],
)
def test_both_precision_paths_train_a_model_that_beats_the_untrained_trunk(
    tmp_path: Path,
    labelled_session: Any,
    untrained: tuple[float, float],
    small_slides: Any,
    precision: str,
) -> None:
    """Issue 27: the same training check on the fp32 path (forced) and the bf16 path (where the
    CPU takes it), so a machine of either kind runs both where it can."""
    config = tiny_config("pos+neg", autocast=precision == "bf16")
    result = train_session(labelled_session, _search(tmp_path), config=config, open_image=_open)
    assert result.metrics["precision"] == precision  # the path asked for is the path taken
    for stage in result.metrics["stages"].values():
        assert all(np.isfinite(stage.get("loss", [0.0])))
    acc, ce = _heldout_scores(result.bundle, small_slides[1])
    base_acc, base_ce = untrained
    assert acc > base_acc and ce < base_ce, (precision, acc, base_acc, ce, base_ce)


def test_training_is_deterministic_and_leaves_the_search_trunk_alone(
    tmp_path: Path, labelled_session: Any
) -> None:
    search = _search(tmp_path)
    before = {k: v.clone() for k, v in search.extractor.trunk.state_dict().items()}
    rng_state = torch.random.get_rng_state()
    runs = [
        train_session(
            labelled_session, search, config=tiny_config("pos+neg"), open_image=_open, seed=7
        )
        for _ in range(2)
    ]
    a, b = (r.bundle for r in runs)
    assert torch.equal(a.head_weight, b.head_weight)
    assert all(torch.equal(a.trunk_state[k], b.trunk_state[k]) for k in a.trunk_state)
    other = train_session(
        labelled_session, search, config=tiny_config("pos+neg"), open_image=_open, seed=8
    )
    assert not torch.equal(a.head_weight, other.bundle.head_weight)
    after = search.extractor.trunk.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # global RNG untouched


def test_pretrained_weights_keep_early_blocks_frozen(tmp_path: Path, labelled_session: Any) -> None:
    trunk, _, _ = build_trunk("resnet18-l3", "random", seed=3)
    path = tmp_path / "weights.pth"
    torch.save(trunk.state_dict(), path)
    search = _search(tmp_path, path)
    assert search.extractor.weights.kind == "file"
    result = train_session(labelled_session, search, config=tiny_config("pos"), open_image=_open)
    state = result.bundle.trunk_state
    start = trunk.state_dict()
    assert torch.equal(state["conv1.weight"], start["conv1.weight"])
    assert torch.equal(state["layer2.1.bn2.running_mean"], start["layer2.1.bn2.running_mean"])
    assert not torch.equal(state["layer3.1.conv2.weight"], start["layer3.1.conv2.weight"])
    assert result.bundle.provenance["frozen"] == ["conv1", "layer1", "layer2"]
    assert not any("random" in n for n in result.notes)


def test_validation_split_sets_thresholds(tmp_path: Path, labelled_session: Any) -> None:
    result = train_session(
        labelled_session,
        _search(tmp_path),
        config=tiny_config("pos", val_fraction=0.34, min_val_per_class=1),
        open_image=_open,
    )
    m = result.metrics
    assert m["validation"]["n"] == 4  # one of each class's 3 patches
    assert "baseline_validation" in m
    assert set(result.bundle.thresholds) == set(result.bundle.classes)
    assert all(0.05 <= t <= 0.95 for t in result.bundle.thresholds.values())


def test_one_class_without_background_is_refused(tmp_path: Path, small_slides: Any) -> None:
    from simsearch_wsi.review.session import Session
    from simsearch_wsi.search.similarity import Prototype

    slide = small_slides[0]
    session = Session.create(tmp_path / "s")
    session.add_prototypes(slide.path, [Prototype("ring", slide.objects_of("ring")[0].box)])
    session.save()
    search = _search(tmp_path)
    cfg = tiny_config("pos", background_per_image=0)
    with pytest.raises(ConfigError, match="at least two classes"):
        train_session(session, search, config=cfg, open_image=_open)


def test_unknown_strategy_and_preset() -> None:
    with pytest.raises(ConfigError, match="strategy"):
        TrainConfig.preset_config("fast", strategy="neg")
    with pytest.raises(ConfigError, match="preset"):
        TrainConfig.preset_config("slow")
    paper = TrainConfig.preset_config("paper")
    assert (paper.selflearn.epochs, paper.selflearn.batch_size, paper.selflearn.temperature) == (
        100,
        128,
        0.5,
    )
    assert (paper.supcon.epochs, paper.supcon.batch_size, paper.supcon.temperature) == (
        50,
        32,
        0.07,
    )
    assert (paper.selflearn.decay_epoch, paper.selflearn.decay_factor) == (50, 0.05)
    assert (paper.supcon.decay_epoch, paper.supcon.decay_factor) == (25, 0.1)
    assert paper.clean_augment.solarize_p == 0 and paper.clean_augment.dropout_p == 0
    assert paper.noisy_augment.solarize_p > 0 and paper.noisy_augment.dropout_p > 0


def test_fluorescence_channels_are_encoded_one_by_one(
    tmp_path: Path, fluorescence_slide: Any
) -> None:
    """Multichannel images train through the shared trunk channel by channel (Microsnoop): the
    head sees 256 features per channel, and the dataset's percentile normalisation is kept."""
    from simsearch_wsi.train.fit import TrainingData, train_patch_model

    slide = fluorescence_slide
    key = str(slide.path.resolve())
    classes = (*slide.classes, "background")
    samples = [PatchSample(key, o.center_l0, classes.index(o.class_name)) for o in slide.objects]
    bg = slide.background_boxes(8, seed=1, size_l0=slide.objects[0].width_l0)
    samples += [PatchSample(key, b.center_l0, len(classes) - 1, "background") for b in bg]
    with open_image(slide.path) as image:
        norm = fit_normalization([image])
        channels = image.channel_names
    box = slide.objects[0].box
    data = TrainingData(
        clean=PatchSet(tuple(samples), classes),
        negatives=PatchSet((), classes),
        noisy=PatchSet((), classes),
        patch_size_l0=(box.width_l0, box.height_l0),
        normalization=norm,
        channels=channels,
        rgb=False,
        mpp=slide.mpp,
        colors={c: (255, 0, 0) for c in classes},
    )
    trunk, spec, info = build_trunk("resnet18-l3", "random", seed=0)
    extractor = FeatureExtractor(trunk, spec, info, autocast=False)
    result = train_patch_model(data, extractor, config=tiny_config("pos"), open_image=_open)
    bundle = result.bundle
    assert not bundle.rgb and bundle.channels == tuple(channels)
    assert bundle.feature_dim == 256 * len(channels)
    assert bundle.normalization["method"] == "simsearch-percentile"
    probs = predict_patches(bundle, data.clean, open_image=_open)
    m = classification_metrics(probs, data.clean.labels, classes=classes)
    assert m["balanced_accuracy"] >= 0.75  # it learned its own training patches


def test_not_class_loss_is_the_two_way_cross_entropy_against_background() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 1])
    # class 2 is background: softplus(z_y - z_bg) per row, i.e. -log(p_bg / (p_bg + p_y))
    want = torch.log1p(torch.exp(torch.tensor(1.5))) + torch.log1p(torch.exp(torch.tensor(2.0)))
    assert float(not_class_loss(logits, labels, background=2)) == pytest.approx(
        float(want) / 2, rel=1e-6
    )
    # the other classes do not enter: moving class 1's logit in row 0 changes nothing
    moved = logits.clone()
    moved[0, 1] = 10.0
    assert float(not_class_loss(moved, labels, background=2)) == pytest.approx(
        float(want) / 2, rel=1e-6
    )


def test_rejected_suggestions_in_the_linear_head_lower_their_class() -> None:
    """Issue 27 option ``linear_negatives``: the head scores a rejected look-alike lower for the
    class it was rejected for than the same head trained without it."""
    rng = np.random.default_rng(0)
    pos = torch.from_numpy(rng.normal(0, 1, (60, 8)).astype(np.float32))
    pos[:30, 0] += 3.0  # class 0; the rest background
    labels = torch.tensor([0] * 30 + [1] * 30)
    look_alike = torch.from_numpy(rng.normal(0, 1, (20, 8)).astype(np.float32))
    look_alike[:, 0] += 3.0
    look_alike[:, 1] += 3.0  # like class 0, plus one feature the positives lack
    stage = StageConfig(30, 32, 1e-2)
    p_c = []
    for negatives in (None, (look_alike, torch.zeros(20, dtype=torch.long))):
        w, b, _ = _train_linear(
            pos, labels, 2, stage, rng=np.random.default_rng(1), seed=1, negatives=negatives
        )
        p_c.append(float(torch.softmax(look_alike @ w.T + b, dim=1)[:, 0].mean()))
    assert p_c[1] < p_c[0] - 0.2
