"""Dense inference (issue 6, first part): class maps equal the per-window classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simsearch_wsi.infer.dense import (
    PatchModel,
    dense_class_maps,
    detect,
    predict_patches,
    segment,
    untrained_bundle,
)
from simsearch_wsi.io import open_image
from simsearch_wsi.train.bundle import ModelBundle
from simsearch_wsi.train.patches import PatchSample, PatchSet

CLASSES = ("ring", "cluster", "stripes", "background")


def _bundle(slide: Any, *, context_a: int) -> ModelBundle:
    """An untrained bundle (random trunk and head) on the slide's patch size."""
    with open_image(slide.path) as image:
        return untrained_bundle([image], classes=CLASSES, context_a=context_a, seed=2)


def _sampled_windows(
    maps: Any, finite: Any, slide: Any, n: int = 24
) -> tuple[Any, tuple[PatchSample, ...]]:
    """``n`` seeded windows (i, j) of the maps where every class is finite, and a patch sample
    centred on each (class index 0)."""
    cells = np.argwhere(finite)
    pick = cells[np.random.default_rng(0).choice(len(cells), n, replace=False)]
    key = str(slide.path.resolve())
    samples = tuple(
        PatchSample(key, maps.window_box_l0(float(i), float(j)).center_l0, 0) for i, j in pick
    )
    return pick, samples


def test_dense_maps_equal_the_classifier_on_cropped_windows(small_slides: Any) -> None:
    """With the trunk's full receptive field as context, cropping a window and classifying it
    gives what the dense map holds there (the head and the pooling commute)."""
    slide = small_slides[1]
    bundle = _bundle(slide, context_a=112)
    model = PatchModel(bundle, autocast=False)
    with open_image(slide.path) as image:
        maps = dense_class_maps(image, model, tile_size=256)
    p = maps.probabilities
    assert p.shape[0] == 4
    finite = np.isfinite(p).all(axis=0)
    assert finite.mean() > 0.3
    np.testing.assert_allclose(p[:, finite].sum(axis=0), 1.0, atol=1e-5)
    pick, samples = _sampled_windows(maps, finite, slide)
    per_window = predict_patches(
        bundle, PatchSet(samples, CLASSES), open_image=lambda q: open_image(q), autocast=False
    )
    dense = np.stack([p[:, i, j] for i, j in pick])
    np.testing.assert_allclose(per_window, dense, atol=2e-4)


def test_detections_and_segmentation_follow_the_maps(small_slides: Any) -> None:
    slide = small_slides[1]
    bundle = _bundle(slide, context_a=32)
    with open_image(slide.path) as image:
        maps = dense_class_maps(image, PatchModel(bundle))
    thresholds = {c: 0.3 for c in CLASSES}
    dets = detect(maps, thresholds)
    assert dets and all(d.class_name != "background" for d in dets)
    # a linear head ranks by the log-odds against all other classes
    assert not maps.rank_against_background
    for d in dets[:20]:
        p_c = d.probabilities[d.class_name]
        assert d.score == pytest.approx(np.log(p_c / (1.0 - p_c)), abs=1e-3)
    for d in dets[:20]:
        assert d.probability >= 0.3
        assert d.probability == max(d.probabilities.values())
        assert abs(sum(d.probabilities.values()) - 1) < 1e-4
    for d in dets:  # QuPath objects stay inside the image, also at its border
        b = d.box
        assert b.x_l0 >= 0 and b.y_l0 >= 0 and b.width_l0 > 0 and b.height_l0 > 0
        assert b.x1_l0 <= slide.width and b.y1_l0 <= slide.height
    seg = segment(maps, thresholds)
    assert seg.classes == CLASSES[:3]
    h, w = seg.labels.shape
    assert abs(w * seg.downsample[0] - slide.width) <= seg.downsample[0]
    assert abs(h * seg.downsample[1] - slide.height) <= seg.downsample[1]
    assert seg.labels.max() <= 3
    # a pixel's label is its most probable class when that reaches the threshold
    probs = seg.probabilities
    ok = np.isfinite(probs).all(axis=0)
    labelled = (seg.labels > 0) & ok
    assert labelled.any()
    np.testing.assert_array_equal(probs[:, labelled].argmax(axis=0) + 1, seg.labels[labelled])


def test_box_clipping() -> None:
    from simsearch_wsi.core.geometry import BoxL0

    assert BoxL0(-4, 10, 20, 20).clipped(100, 25) == BoxL0(0, 10, 16, 15)
    assert BoxL0(10, 10, 5, 5).clipped(100, 100) == BoxL0(10, 10, 5, 5)
    outside = BoxL0(200, 10, 5, 5).clipped(100, 100)
    assert outside.width_l0 == 0 and outside.x_l0 == 100


def test_channels_the_model_needs_must_be_there(
    tmp_path: Path, small_slides: Any, fluorescence_slide: Any
) -> None:
    from simsearch_wsi.core.errors import ConfigError

    bundle = _bundle(small_slides[1], context_a=32)
    with open_image(fluorescence_slide.path) as image, pytest.raises(ConfigError, match="channels"):
        dense_class_maps(image, PatchModel(bundle))


def _search_heads(slide: Any, *, expert_share: float) -> ModelBundle:
    """An ensemble-shaped bundle on ``slide``: two random search heads (memories of 8 unit
    vectors, two per class) on the same random trunk, the second the first's partner, with a
    similarity expert on the partner's first three entries at ``expert_share`` (0: none)."""
    import dataclasses

    import torch

    from simsearch_wsi.train.ensemble import similarity_expert_head

    with open_image(slide.path) as image:
        base = untrained_bundle([image], classes=CLASSES, context_a=32, seed=2)
    dim = base.head_weight.shape[1]
    gen = torch.Generator().manual_seed(3)

    def head(**changes: Any) -> ModelBundle:
        vectors = torch.nn.functional.normalize(torch.randn(8, dim, generator=gen), dim=1)
        return dataclasses.replace(
            base,
            head_input="search",
            feature_norm="whiten",
            head_weight=torch.rand(4, 2, generator=gen) * 8,
            head_bias=torch.randn(4, generator=gen),
            memory_vectors=vectors.to(torch.float16),
            memory_owner=torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]),
            **changes,
        )

    partner = head(provenance={"search_trunk": "search"})
    if expert_share > 0:
        weight, bias = similarity_expert_head(4, 3, temperature=0.1, ceiling=0.2)
        partner = dataclasses.replace(
            partner,
            expert_mask=torch.tensor([True, True, True, False, False, False, False, False]),
            expert_weight=weight,
            expert_bias=bias,
            expert_share=expert_share,
        )
    return head(provenance={"search_trunk": "fine-tuned"}, partner=partner)


@pytest.mark.slow
def test_an_ensembles_similarity_expert_predicts_alike_densely_per_patch_and_cached(
    small_slides: Any, tmp_path: Path
) -> None:
    """A version 4 ensemble (the partner with a similarity expert): the dense maps are the
    weighted product of the two heads' maps and the expert's; ``predict_patches`` gives the
    same probabilities at the windows' centres; maps from cached features equal those from a
    temporary cache; without the expert, the two heads' product as before."""
    import dataclasses

    from simsearch_wsi.infer.dense import _search_class_maps
    from simsearch_wsi.train.ensemble import combine_experts

    slide = small_slides[1]
    pair = _search_heads(slide, expert_share=0.5)
    assert pair.partner is not None and pair.partner.has_expert
    model = PatchModel(pair, autocast=False)
    cached = PatchModel(pair, autocast=False, cache_dir=tmp_path / "cache")
    with open_image(slide.path) as image:
        maps = dense_class_maps(image, model)
        first = dense_class_maps(image, cached)
        again = dense_class_maps(image, cached)
        alone = dense_class_maps(
            image, PatchModel(dataclasses.replace(pair, partner=None), autocast=False)
        )
        assert cached.partner is not None
        other, expert = _search_class_maps(
            image, cached.partner, tile_size=1024, batch_size=4, tiles="foreground", progress=None
        )
    assert expert is not None
    p = maps.probabilities
    expected = combine_experts(
        [alone.probabilities, other.probabilities, expert], weights=[1.0, 1.0, 0.5]
    )
    np.testing.assert_array_equal(p, expected)
    two = combine_experts([alone.probabilities, other.probabilities])
    assert not np.allclose(p, two, equal_nan=True)  # the expert counts
    np.testing.assert_array_equal(first.probabilities, p)
    np.testing.assert_array_equal(again.probabilities, p)
    finite = np.isfinite(p).all(axis=0)
    assert finite.mean() > 0.3
    np.testing.assert_array_equal(np.isnan(p).any(axis=0), ~finite)
    pick, samples = _sampled_windows(maps, finite, slide)
    per_patch = predict_patches(
        pair, PatchSet(samples, CLASSES), open_image=lambda q: open_image(q), autocast=False
    )
    np.testing.assert_allclose(per_patch, np.stack([p[:, i, j] for i, j in pick]), atol=1e-5)
