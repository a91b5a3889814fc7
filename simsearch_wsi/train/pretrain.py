"""Domain pretraining: self-supervised training of the trunk on random foreground patches of a
cohort, giving trunk weights.

This is the offline path to a useful trunk: ImageNet weights cannot be downloaded on machines
without internet, and a trunk adapted to the cohort's tissue and stain helps everyone. The
result is a weights file that ``--weights PATH``
(:func:`simsearch_wsi.features.backbones.build_trunk`) loads like any other.

Patches are centred on random foreground pixels
(:func:`simsearch_wsi.features.tissue.detect_foreground`) of every image, equally many per
image, read on the fly at the analysis scale of ``patch_size_l0`` (as the search reads them),
each image normalised by the cohort's percentile rule (brightfield: fixed range). Starting from
random weights every layer is trained; from pretrained weights conv1 and the first two blocks
stay frozen (as in SimSearch's stage a).

Objectives (``PretrainConfig.objective``; ``masked`` is the default because it gave better
similarity-search features than SimCLR at equal training time, docs/evaluation.md):

``simclr``
    SimSearch's stage a: NT-Xent between two augmented views of each patch, on the pooled
    window vector (what the similarity search compares), through a projection head.
``masked``
    masked-image modelling (:mod:`simsearch_wsi.train.masked`, the Microsnoop idea): blank half of
    the trunk's cells and predict their pixels from the context; one view per patch, so a step costs
    about half of SimCLR's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from simsearch_wsi.core.atomic import atomic_path
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.features.extractor import (
    AnalysisScale,
    FeatureExtractor,
    ProgressFn,
    prefetched,
    trunk_input,
)
from simsearch_wsi.features.preprocess import ChannelNormalization
from simsearch_wsi.features.tissue import detect_foreground
from simsearch_wsi.io.base import ImageSource
from simsearch_wsi.search.similarity import PatchGeometry
from simsearch_wsi.train.augment import AugmentConfig, augment_batch
from simsearch_wsi.train.fit import (
    StageConfig,
    StageLoop,
    TrainConfig,
    TrainRun,
    child_seed,
    contrastive_stage,
)
from simsearch_wsi.train.masked import PixelDecoder, masked_loss
from simsearch_wsi.train.model import PatchEncoder, freeze, set_trainable, train_mode
from simsearch_wsi.train.patches import CropGeometry, PatchReader, PatchSample, PatchSet

PRETRAIN_FORMAT = "simsearch-wsi-pretrained-trunk"
OBJECTIVES = ("simclr", "masked")


@dataclass(frozen=True)
class PretrainConfig:
    """Pretraining settings; the default is practical on 2 CPU cores (minutes), ``stage`` can
    be the paper's (``TrainConfig.preset_config("paper").selflearn``). ``objective``: one of
    :data:`OBJECTIVES` (module docstring); ``mask_ratio``: fraction of cells blanked by the
    masked objective; ``augment`` applies to SimCLR's views and (without solarize and dropout,
    which would fight the reconstruction) to the masked objective's crops."""

    patches_per_image: int = 256
    objective: str = "masked"
    mask_ratio: float = 0.5
    stage: StageConfig = field(
        default_factory=lambda: StageConfig(10, 64, 1e-3, 7, 0.1, 0.5, max_steps_per_epoch=16)
    )
    context_a: int = 32
    jitter_a: int = 8
    projection_dim: int = 128
    autocast: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig.noisy)

    def __post_init__(self) -> None:
        if self.patches_per_image < 1:
            raise ConfigError(f"patches per image must be >= 1, got {self.patches_per_image}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"unknown pretraining objective {self.objective!r}; use one of "
                f"{', '.join(OBJECTIVES)}"
            )
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mask ratio must be in (0, 1), got {self.mask_ratio}")


@dataclass
class PretrainResult:
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, Any]
    notes: list[str]


def foreground_centers(
    image: ImageSource, n: int, *, rng: np.random.Generator
) -> list[tuple[float, float]]:
    """``n`` random level-0 points (x, y) on the image's foreground (uniform over the mask's
    foreground pixels, uniform inside each); the whole image when no foreground is found."""
    mask = detect_foreground(image)
    cells = np.argwhere(mask.mask)
    w0, h0 = image.dimensions
    if len(cells) == 0:
        xs, ys = rng.uniform(0, w0, n), rng.uniform(0, h0, n)
        return list(zip(xs.tolist(), ys.tolist(), strict=True))
    pick = cells[rng.integers(0, len(cells), n)]
    ys = (pick[:, 0] + rng.uniform(0, 1, n)) * mask.downsample_y
    xs = (pick[:, 1] + rng.uniform(0, 1, n)) * mask.downsample_x
    return list(zip(np.clip(xs, 0, w0 - 1).tolist(), np.clip(ys, 0, h0 - 1).tolist(), strict=True))


def pretrain_trunk(
    image_paths: Sequence[str],
    extractor: FeatureExtractor,
    *,
    normalization: ChannelNormalization,
    channels: Sequence[str],
    rgb: bool,
    patch_size_l0: float,
    open_image: Callable[[str], ImageSource],
    config: PretrainConfig | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> PretrainResult:
    """Self-supervised training (``config.objective``) on random foreground patches of
    ``image_paths``, starting from ``extractor``'s trunk; returns the trained trunk's state dict
    (the extractor and its trunk are not modified). ``device`` defaults to the extractor's."""
    config = config or PretrainConfig()
    trunk, spec, weights = extractor.trunk, extractor.spec, extractor.weights
    device = torch.device(extractor.device if device is None else device)
    if not image_paths:
        raise ConfigError("pretraining needs at least one image")
    rng = np.random.default_rng(seed)
    samples = []
    for k, path in enumerate(image_paths):
        if progress is not None:
            progress("finding foreground", k, len(image_paths))
        with open_image(path) as image:
            centers = foreground_centers(image, config.patches_per_image, rng=rng)
        samples += [PatchSample(path, c, k, "random") for c in centers]
    if progress is not None:
        progress("finding foreground", len(image_paths), len(image_paths))
    # one "class" per image: oversampling keeps small images from being drowned by large ones
    patches = PatchSet(tuple(samples), tuple(str(p) for p in image_paths))
    freeze_early = weights.kind != "random"
    notes = []
    if not freeze_early:
        notes.append("starting from random weights: every layer is trained")
    trunk = copy.deepcopy(trunk).to(device).to(memory_format=torch.channels_last)
    freeze(trunk)
    with open_image(image_paths[0]) as first:
        scale = AnalysisScale.for_patch(first, patch_size_l0)
    geometry = PatchGeometry.from_l0(patch_size_l0, patch_size_l0, scale=scale, stride=spec.stride)
    encoder = PatchEncoder(trunk, spec, geometry=geometry, rgb=rgb, context_a=config.context_a)
    encoder.to(device)
    crop = CropGeometry(patch_size_l0, encoder.window_a, config.context_a, config.jitter_a)
    train_cfg = TrainConfig.preset_config("fast").replace(
        selflearn=config.stage,
        projection_dim=config.projection_dim,
        autocast=config.autocast,
        noisy_augment=config.augment,
    )
    gen = torch.Generator().manual_seed(child_seed(rng))
    with PatchReader(crop, normalization, channels=channels, open_image=open_image) as reader:
        run = TrainRun(
            encoder, reader, train_cfg, device, freeze_early, rng, gen, progress, len(channels)
        )
        if config.objective == "simclr":
            stage = contrastive_stage(
                run, "selflearn", patches=patches, stage=config.stage, augment=config.augment
            )
        else:
            stage = masked_stage(run, patches, config=config)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.trunk.state_dict().items()}
    metrics = {
        "objective": config.objective,
        "images": len(image_paths),
        "patches": len(patches),
        "analysis_downsample": scale.downsample_x,
        "stage": stage,
    }
    return PretrainResult(state, metrics, notes)


def masked_stage(run: TrainRun, patches: PatchSet, *, config: PretrainConfig) -> dict[str, Any]:
    """The masked objective (:mod:`simsearch_wsi.train.masked`) on ``patches``, with the optimiser
    and schedule of ``config.stage``; returns the stage's record (as the contrastive stage's)."""
    stage = config.stage
    trunk = run.encoder.trunk
    spec = run.encoder.spec
    gen = torch.Generator().manual_seed(child_seed(run.rng))
    with torch.random.fork_rng(devices=[]):
        decoder = PixelDecoder(spec.out_channels, spec.stride)
    for m in decoder.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=5**0.5, generator=gen)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    decoder.to(run.device)
    params = set_trainable(trunk, freeze_early=run.freeze_early) + list(decoder.parameters())
    augment = dataclasses.replace(config.augment, solarize_p=0.0, dropout_p=0.0)
    steps = stage.steps_per_epoch(len(patches))
    loop = StageLoop(run, "masked", stage=stage, params=params, steps=steps)
    jitter = np.random.default_rng(child_seed(run.rng))
    for _ in range(stage.epochs):
        train_mode(trunk, freeze_early=run.freeze_early)
        decoder.train()
        batches = [patches.draw(stage.batch_size, run.rng) for _ in range(steps)]

        def load(idx: Any) -> torch.Tensor:
            return run.reader.read([patches.samples[i] for i in idx], rng=jitter)

        for k, x in enumerate(prefetched(load, batches)):
            x = augment_batch(x.to(run.device), augment, generator=gen)
            inputs = trunk_input(x, spec, rgb=run.encoder.rgb)
            with run.autocast():
                loss = masked_loss(
                    trunk,
                    decoder,
                    x=inputs,
                    stride=spec.stride,
                    mask_ratio=config.mask_ratio,
                    generator=gen,
                )
            loop.step(loss, k, views=inputs.shape[0])
        loop.end_epoch()
    freeze(trunk)
    return loop.record(len(patches), mask_ratio=config.mask_ratio)


def save_pretrained(
    path: str | Path,
    result: PretrainResult,
    *,
    base: FeatureExtractor,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the trunk weights (``{"state_dict": ..., "simsearch_wsi": json}``) atomically; the
    file loads with ``--weights PATH`` and ``torch.load(weights_only=True)``. ``base`` is the
    extractor pretraining started from: its backbone and weights are recorded."""
    base_weights = base.weights
    meta = {
        "format": PRETRAIN_FORMAT,
        "version": 1,
        "backbone": base.spec.name,
        "base_weights": {"kind": base_weights.kind, "identity": base_weights.identity},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "metrics": result.metrics,
        "notes": result.notes,
        **(extra or {}),
    }
    out = Path(path)
    with atomic_path(out) as tmp:
        torch.save({"state_dict": result.state_dict, "simsearch_wsi": json.dumps(meta)}, tmp)
    return out
