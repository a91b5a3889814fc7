"""Dense inference (issue 6, first part): class maps equal the per-window classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from simsearch_wsi.backbones import build_trunk
from simsearch_wsi.bundle import ModelBundle
from simsearch_wsi.features import AnalysisScale
from simsearch_wsi.infer import PatchModel, dense_class_maps, detect, segment
from simsearch_wsi.io import open_image
from simsearch_wsi.patches import PatchSample, PatchSet
from simsearch_wsi.preprocess import fit_normalization
from simsearch_wsi.similarity import PatchGeometry
from simsearch_wsi.train import predict_patches

CLASSES = ("ring", "cluster", "stripes", "background")


def _bundle(slide: Any, *, context_a: int) -> ModelBundle:
    """An untrained bundle (random trunk and head) on the slide's patch size."""
    trunk, _, _ = build_trunk("resnet18-l3", "random", seed=2)
    gen = torch.Generator().manual_seed(0)
    with open_image(slide.path) as image:
        norm = fit_normalization([image])
        scale = AnalysisScale.for_patch(image, 48)
    geometry = PatchGeometry.from_l0(48, 48, scale, 16)
    return ModelBundle(
        backbone="resnet18-l3",
        trunk_state=trunk.state_dict(),
        head_weight=torch.randn(4, 256, generator=gen) * 0.1,
        head_bias=torch.zeros(4),
        classes=CLASSES,
        colors={c: (200, 0, 0) for c in CLASSES},
        thresholds={c: 0.3 for c in CLASSES},
        patch_size_l0=(48.0, 48.0),
        mpp=slide.mpp,
        analysis_downsample=scale.downsample_x,
        context_a=context_a,
        geometry=geometry.to_dict(),
        normalization=norm.to_dict(),
        channels=("R", "G", "B"),
        rgb=True,
        strategy="pos",
        config={},
        metrics={},
    )


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
    cells = np.argwhere(finite)
    pick = cells[np.random.default_rng(0).choice(len(cells), 24, replace=False)]
    key = str(slide.path.resolve())
    samples = tuple(
        PatchSample(key, maps.window_box_l0(float(i), float(j)).center_l0, 0) for i, j in pick
    )
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
    for d in dets[:20]:
        assert d.probability >= 0.3
        assert d.probability == max(d.probabilities.values())
        assert abs(sum(d.probabilities.values()) - 1) < 1e-4
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


def test_channels_the_model_needs_must_be_there(
    tmp_path: Path, small_slides: Any, fluorescence_slide: Any
) -> None:
    from simsearch_wsi.errors import ConfigError

    bundle = _bundle(small_slides[1], context_a=32)
    with open_image(fluorescence_slide.path) as image, pytest.raises(ConfigError, match="channels"):
        dense_class_maps(image, PatchModel(bundle))
