"""Training the patch model: self-learning on noisy patches, supervised contrastive with the
user's negatives, then a linear classifier (SimSearch, section 2 of DESIGN.md).

Stages (each optional stage is switched by the strategy):

(a) ``selflearn`` - SimCLR (NT-Xent, tau 0.5) on the noisy patches mined from images the user did
    not review, with a 2-layer projection head, strong augmentations (flips, rotation, solarize,
    coarse dropout, brightness/contrast);
(b) ``supcon`` - supervised contrastive loss (tau 0.07) on the user's clean patches; with
    negatives, the patches the user rejected for class y join the denominator of anchors of
    class y; the same augmentations minus solarize and dropout;
(c) ``linear`` - projection head dropped, trunk frozen, a linear layer on the pooled features
    trained with cross-entropy.

Every stage oversamples under-represented classes (each class equally likely per draw). With
pretrained trunk weights, conv1 and the first two blocks stay frozen in (a) and (b); with random
weights nothing is frozen (freezing random filters would only cripple the model) and a note says
so. Everything is seeded from one ``seed`` with private generators: two runs on the CPU with the
same inputs give the same bundle.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.features.backbones import WeightsInfo
from simsearch_wsi.features.extractor import (
    AnalysisScale,
    FeatureExtractor,
    ProgressFn,
    prefetched,
)
from simsearch_wsi.features.precision import autocast_pays_off
from simsearch_wsi.features.preprocess import ChannelNormalization
from simsearch_wsi.io.base import ImageSource
from simsearch_wsi.qupath.geojson import BACKGROUND_CLASS
from simsearch_wsi.search.probe import (
    MEMORY_ROTATIONS,
    MemoryHead,
    fit_memory_head,
    macro_average_precision,
)
from simsearch_wsi.search.similarity import PatchGeometry
from simsearch_wsi.train.augment import AugmentConfig, augment_batch
from simsearch_wsi.train.bundle import ModelBundle
from simsearch_wsi.train.choices import (
    DEFAULT_HEAD_INPUT,
    DEFAULT_SIMILARITY_EXPERT,
    DEFAULT_STRATEGY,
    HEAD_INPUTS,
    PRESETS,
    STRATEGIES,
)
from simsearch_wsi.train.ensemble import (
    SIMILARITY_EXPERT_CEILING,
    SIMILARITY_EXPERT_TEMPERATURE,
    combine_experts,
    similarity_expert_head,
)
from simsearch_wsi.train.losses import nt_xent, supcon
from simsearch_wsi.train.model import (
    PatchEncoder,
    ProjectionHead,
    freeze,
    set_trainable,
    train_mode,
)
from simsearch_wsi.train.patches import (
    CropGeometry,
    PatchReader,
    PatchSet,
    stratified_split,
)

#: in ``auto``, the search head is kept only when its held-out macro average precision beats the
#: fine-tuned trunk's by more than this (ties go to the trunk, which won most rows of the
#: training study in docs/evaluation.md)
SELECTION_MARGIN = 0.02
#: ``auto`` compares heads with its judge (one held-out patch per class ranked among unlabelled
#: windows) only when every class has at least this many labelled patches; with fewer, the
#: search heads are not worth holding a patch out for (3 per class: the trunk's linear head
#: ranked best, docs/evaluation.md "Training study") and ``auto`` trains as ``trunk``
JUDGE_MIN_PER_CLASS = 5
#: ``auto`` (without a judge) trains the ensemble (``--head-input ensemble``) when every class
#: has at least this many labelled patches and the images are brightfield RGB, else the
#: fine-tuned trunk's linear head: with 3 per class the linear head ranked best, from 5 per
#: class on brightfield the search heads did (docs/evaluation.md, "Training study")
AUTO_ENSEMBLE_MIN_PER_CLASS = 5
DEFAULT_CONFIDENCE = 0.5
#: how per-class confidence thresholds are picked: ``held-out-f1`` (the default:
#: :func:`pick_thresholds`, the best F1 on the held-out patches, 0.5 with too few of them) or
#: ``tail`` (:func:`tail_thresholds`, for the ensemble of two search heads: it has
#: leave-one-out and unlabelled evidence; experimental, see :class:`TrainConfig`)
THRESHOLD_RULES = ("tail", "held-out-f1")
#: ``tail``: the quantile of the labelled positives' probabilities (held-out and leave-one-out)
#: that stands for a class's weaker objects
TAIL_POSITIVE_QUANTILE = 0.25
#: ``tail``: the quantile of the unlabelled windows' probabilities that stands for the
#: background's upper tail (floored at :data:`TAIL_BACKGROUND_FLOOR`)
TAIL_BACKGROUND_QUANTILE = 0.99
TAIL_BACKGROUND_FLOOR = 0.01
#: ``tail``: the positives' weight when the two are interpolated in logit space (2/3: nearer
#: the positives than the background)
TAIL_POSITIVE_WEIGHT = 0.67
#: ``tail`` never picks a threshold above this (0.5: the class is more probable than all the
#: others together) nor below the lowest of the grid of :func:`pick_thresholds`
TAIL_MAX = DEFAULT_CONFIDENCE
TAIL_MIN = 0.05
#: the contrastive stages turn their patches by at most this many degrees when the fine-tuned
#: trunk feeds search heads (``tuned-search``, ``ensemble``). A search head's memory holds every
#: labelled patch in :data:`MEMORY_ROTATIONS` rotations 90 degrees apart, so the trunk only needs
#: to be robust to the turns between them; turned by up to 180 degrees, it learned that a
#: pattern and the same pattern at right angles are one, and ranked the look-alike made of both
#: (stripes crossed by stripes) with the class (docs/evaluation.md, "Training study", stop 26)
SEARCH_HEAD_ROTATE_DEG = 45.0


@dataclass(frozen=True)
class StageConfig:
    """Optimisation of one stage: Adam at ``lr``, multiplied by ``decay_factor`` after
    ``decay_epoch`` epochs (step decay; ``None`` = constant). An epoch is one pass over the
    stage's patches (oversampled draws), capped at ``max_steps_per_epoch`` batches."""

    epochs: int
    batch_size: int
    lr: float
    decay_epoch: int | None = None
    decay_factor: float = 1.0
    temperature: float = 0.5
    max_steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 2 or not self.lr > 0:
            raise ConfigError(
                f"stage needs epochs >= 0, batch size >= 2 and lr > 0, got {self.epochs}, "
                f"{self.batch_size}, {self.lr}"
            )
        if not self.temperature > 0 or not 0 < self.decay_factor <= 1:
            raise ConfigError(
                f"temperature must be > 0 and decay factor in (0, 1], got {self.temperature}, "
                f"{self.decay_factor}"
            )

    def steps_per_epoch(self, n_patches: int) -> int:
        steps = max(1, math.ceil(n_patches / self.batch_size))
        return min(steps, self.max_steps_per_epoch) if self.max_steps_per_epoch else steps


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run does besides its data. Build with :meth:`preset`."""

    strategy: str
    preset: str
    selflearn: StageConfig
    supcon: StageConfig
    linear: StageConfig
    projection_dim: int = 128
    context_a: int = 32
    jitter_a: int = 8
    linear_views: int = 8
    #: weight of the rejected suggestions' loss in the linear head (background over the class
    #: they were rejected for; only where the strategy uses negatives); 0 = off. Off: the
    #: training study measured 1.0 lower on every case (docs/evaluation.md, issue 27)
    linear_negatives: float = 0.0
    #: windows drawn at random from the reviewed images that calibrate a search head as
    #: unlabelled background (:func:`simsearch_wsi.search.probe.fit_memory_head`); 0 = off.
    #: On: the search heads' thresholded F1 rose on every few-label slide with PR-AUC equal or
    #: higher (docs/evaluation.md, "Training study")
    unlabelled_windows: int = 256
    #: in ``auto``, unlabelled patches drawn at random from the reviewed images that the
    #: held-out comparison of the heads ranks the held-out patches against (as background);
    #: 0 = the held-out patches alone (:func:`_select`). Off: measured, it chose well on 3 of 5
    #: cases and kept a failing linear head on 2 (docs/evaluation.md, "Training study")
    judge_windows: int = 0
    noisy_per_class: int = 64
    background_per_image: int = 48
    val_fraction: float = 0.2
    min_val_per_class: int = 2
    #: :data:`THRESHOLD_RULES`; ``tail`` (experimental, not the default) applies to the ensemble
    #: only, every other head keeps ``held-out-f1``. On the ensemble, ``tail`` raised detection
    #: F1 at the thresholds on the training study's dev cases (0.788 -> 0.855, IoU equal) but
    #: not on the held-out cases (3 of 6 up, 3 down, mean 0.718 -> 0.723; seed73-P3 0.89 ->
    #: 0.71); on the single search head it did not help on the dev cases either
    #: (docs/evaluation.md, "Training study", "thresholds of the combined probability")
    threshold_rule: str = "held-out-f1"
    #: the ensemble's similarity expert: the weight, in the product of experts (the two search
    #: heads weigh 1 each), of the search's own similarity to the user's prototypes as class
    #: probabilities (:func:`simsearch_wsi.train.ensemble.similarity_expert_head`, read from
    #: the partner's memory at ``predict``; ``ModelBundle.expert_mask``); 0 = off (the two
    #: heads alone), the default. 0.25 (``CHOSEN_SIMILARITY_EXPERT``): chosen on 10 dev cases,
    #: then on 8 held-out cases the ensemble's PR-AUC rose on 7 and was at or above the
    #: search's on 6 instead of 5, but F1 / IoU at the thresholds fell (0.741 / 0.386 -> 0.718 /
    #: 0.326), so it is not the default (docs/evaluation.md, "Training study", "the search's
    #: similarity as a third expert")
    similarity_expert: float = DEFAULT_SIMILARITY_EXPERT
    #: the contrastive stages' rotation range (degrees, in [0, 180]) where the fine-tuned trunk
    #: feeds search heads: the smaller of this and the augmentations' own ``rotate_deg``
    #: (:data:`SEARCH_HEAD_ROTATE_DEG`); ``None`` = the augmentations' own. The trunk's linear
    #: head (``trunk``), which has no rotated memory, keeps the augmentations' range
    search_head_rotate_deg: float | None = SEARCH_HEAD_ROTATE_DEG
    autocast: bool = True
    head_input: str = DEFAULT_HEAD_INPUT
    noisy_augment: AugmentConfig = field(default_factory=AugmentConfig.noisy)
    clean_augment: AugmentConfig = field(default_factory=AugmentConfig.clean)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"unknown strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}"
            )
        if self.head_input not in HEAD_INPUTS:
            raise ConfigError(
                f"unknown head input {self.head_input!r}; use one of {', '.join(HEAD_INPUTS)}"
            )
        if not 0 <= self.val_fraction < 1 or self.linear_views < 1 or self.context_a < 0:
            raise ConfigError("val_fraction must be in [0, 1), linear_views >= 1, context >= 0")
        if self.linear_negatives < 0:
            raise ConfigError(f"linear_negatives must be >= 0, got {self.linear_negatives}")
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ConfigError(
                f"unknown threshold rule {self.threshold_rule!r}; use one of "
                f"{', '.join(THRESHOLD_RULES)}"
            )
        if not (math.isfinite(self.similarity_expert) and self.similarity_expert >= 0):
            raise ConfigError(
                f"similarity_expert must be a weight >= 0, got {self.similarity_expert}"
            )
        if self.similarity_expert > 0 and self.head_input not in ("ensemble", "auto"):
            # only the ensemble has the partner the expert is read from: refused rather than
            # silently dropped
            raise ConfigError(
                f"the similarity expert (--similarity-expert, similarity_expert "
                f"{self.similarity_expert:g}) is a third expert of the head input 'ensemble' "
                f"(or 'auto' where it trains one), not of {self.head_input!r}; leave it at 0 or "
                f"train the ensemble"
            )
        limit = self.search_head_rotate_deg
        if limit is not None and (
            isinstance(limit, bool)
            or not isinstance(limit, int | float)
            or not 0 <= limit <= 180  # also refuses NaN
        ):
            raise ConfigError(
                f"search_head_rotate_deg must be None or a number of degrees in [0, 180], got "
                f"{limit!r}"
            )
        if self.unlabelled_windows < 0 or self.judge_windows < 0:
            raise ConfigError(
                f"unlabelled_windows and judge_windows must be >= 0, got "
                f"{self.unlabelled_windows} and {self.judge_windows}"
            )

    @property
    def uses_negatives(self) -> bool:
        return "neg" in self.strategy.split("+")

    @property
    def uses_selflearn(self) -> bool:
        return "selflearn" in self.strategy.split("+")

    @classmethod
    def preset_config(cls, name: str = "fast", *, strategy: str = DEFAULT_STRATEGY) -> TrainConfig:
        """``paper``: the SimSearch paper's epochs, optimiser, schedules, batch sizes and
        temperatures. ``fast``: a few minutes on 2 CPU cores (fewer, capped epochs). ``quick``:
        about a minute on 2 CPU cores (the demo, smoke runs): a dozen contrastive steps per
        stage, fewer noisy and background patches."""
        if name == "paper":
            return cls(
                strategy=strategy,
                preset=name,
                selflearn=StageConfig(100, 128, 1e-3, 50, 0.05, 0.5),
                supcon=StageConfig(50, 32, 1e-3, 25, 0.1, 0.07),
                linear=StageConfig(100, 32, 1e-3),
            )
        if name == "fast":
            return cls(
                strategy=strategy,
                preset=name,
                selflearn=StageConfig(8, 64, 1e-3, 6, 0.05, 0.5, max_steps_per_epoch=6),
                supcon=StageConfig(16, 32, 1e-3, 12, 0.1, 0.07, max_steps_per_epoch=6),
                linear=StageConfig(60, 64, 1e-2, 40, 0.1),
            )
        if name == "quick":
            return cls(
                strategy=strategy,
                preset=name,
                selflearn=StageConfig(3, 32, 1e-3, None, 1.0, 0.5, max_steps_per_epoch=4),
                supcon=StageConfig(6, 32, 1e-3, None, 1.0, 0.07, max_steps_per_epoch=4),
                linear=StageConfig(40, 64, 1e-2, 30, 0.1),
                noisy_per_class=32,
                background_per_image=32,
                linear_views=4,
            )
        raise ConfigError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def stage_augments(self, *, search_heads: bool) -> tuple[AugmentConfig, AugmentConfig]:
        """The (self-learning, supervised contrastive) stages' augmentations: where the trunk
        feeds search heads (``search_heads``), turned by at most :attr:`search_head_rotate_deg`
        degrees."""
        limit = self.search_head_rotate_deg
        if not search_heads or limit is None:
            return self.noisy_augment, self.clean_augment
        noisy, clean = self.noisy_augment, self.clean_augment
        return (
            dataclasses.replace(noisy, rotate_deg=min(noisy.rotate_deg, float(limit))),
            dataclasses.replace(clean, rotate_deg=min(clean.rotate_deg, float(limit))),
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["noisy_augment"] = self.noisy_augment.to_dict()
        d["clean_augment"] = self.clean_augment.to_dict()
        return d


@dataclass
class TrainingData:
    """What a run trains on. ``clean`` holds the user's positives and background (classes =
    the user's classes, then ``background``); ``negatives`` and ``noisy`` label into the same
    classes (a negative's label is the class it was rejected for)."""

    clean: PatchSet
    negatives: PatchSet
    noisy: PatchSet
    patch_size_l0: tuple[float, float]
    normalization: ChannelNormalization
    channels: tuple[str, ...]
    rgb: bool
    mpp: float | None
    colors: dict[str, tuple[int, int, int]]
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, Any]:
        return {
            "clean": self.clean.class_counts(),
            "negatives": self.negatives.class_counts(),
            "noisy": self.noisy.class_counts(),
        }


# --- the stages ---------------------------------------------------------------------------------
@dataclass
class TrainRun:
    """What every stage shares."""

    encoder: PatchEncoder
    reader: PatchReader
    config: TrainConfig
    device: torch.device
    freeze_early: bool
    rng: np.random.Generator
    gen: torch.Generator
    progress: ProgressFn | None
    n_channels: int

    @property
    def bf16(self) -> bool:
        """Whether the stages run in bf16 autocast (asked for, and paying off on the device)."""
        return self.config.autocast and autocast_pays_off(self.device)

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def child_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**62))


def _new_head(in_dim: int, out_dim: int, seed: int) -> ProjectionHead:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        head = ProjectionHead(in_dim, out_dim)
    for m in head.modules():
        if isinstance(m, nn.Linear):
            _init_linear(m, gen)
    return head


def _init_linear(layer: nn.Linear, gen: torch.Generator) -> None:
    """PyTorch's default Linear initialisation, drawn from a private generator."""
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=gen)
        if layer.bias is not None:
            layer.bias.uniform_(-bound, bound, generator=gen)


class StageLoop:
    """What every training stage's loop shares: Adam at ``stage.lr`` with the stage's step
    decay, the optimiser step, the running loss, progress and the stage's record."""

    def __init__(
        self, run: TrainRun, name: str, *, stage: StageConfig, params: list[Any], steps: int
    ) -> None:
        self.run, self.name, self.stage, self.steps = run, name, stage, steps
        self.opt = torch.optim.Adam(params, lr=stage.lr)
        self.sched = (
            torch.optim.lr_scheduler.StepLR(
                self.opt, step_size=stage.decay_epoch, gamma=stage.decay_factor
            )
            if stage.decay_epoch
            else None
        )
        self.losses: list[float] = []
        self.views = 0
        self.epoch = 0
        self._epoch_loss = 0.0
        self._t0 = time.perf_counter()

    def step(self, loss: torch.Tensor, k: int, *, views: int) -> None:
        """Back-propagate ``loss`` of batch ``k`` of the current epoch (``views`` samples)."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.opt.step()
        self._epoch_loss += float(loss.detach())
        self.views += views
        if self.run.progress is not None:
            self.run.progress(
                f"{self.name} | epoch {self.epoch + 1}/{self.stage.epochs} "
                f"loss {self._epoch_loss / (k + 1):.3f}",
                self.epoch * self.steps + k + 1,
                self.stage.epochs * self.steps,
            )

    def end_epoch(self) -> None:
        self.losses.append(self._epoch_loss / self.steps)
        self._epoch_loss = 0.0
        self.epoch += 1
        if self.sched is not None:
            self.sched.step()

    def record(self, n_patches: int, **extra: Any) -> dict[str, Any]:
        seconds = time.perf_counter() - self._t0
        return {
            "patches": n_patches,
            "epochs": self.stage.epochs,
            "steps_per_epoch": self.steps,
            **extra,
            "loss": [round(v, 5) for v in self.losses],
            "views": self.views,
            "seconds": round(seconds, 2),
            "views_per_s": round(self.views / seconds, 1) if seconds > 0 else None,
        }


def contrastive_stage(
    run: TrainRun,
    name: str,
    *,
    patches: PatchSet,
    stage: StageConfig,
    augment: AugmentConfig,
    negatives: PatchSet | None = None,
) -> dict[str, Any]:
    """SimCLR (``negatives is None`` and ``name == 'selflearn'``) or SupCon on ``patches``."""
    enc = run.encoder
    head = _new_head(
        enc.feature_dim(run.n_channels), run.config.projection_dim, child_seed(run.rng)
    )
    head.to(run.device)
    params = set_trainable(enc.trunk, freeze_early=run.freeze_early) + list(head.parameters())
    steps = stage.steps_per_epoch(len(patches))
    loop = StageLoop(run, name, stage=stage, params=params, steps=steps)
    labels_all = torch.from_numpy(patches.labels)
    jitter = np.random.default_rng(child_seed(run.rng))
    window = enc.window_a
    for _epoch in range(stage.epochs):
        train_mode(enc.trunk, freeze_early=run.freeze_early)
        head.train()
        batches = [patches.draw(stage.batch_size, run.rng) for _ in range(steps)]
        neg_batches: list[NDArray[np.int64] | None] = [
            negatives.draw(stage.batch_size, run.rng)
            if negatives is not None and len(negatives)
            else None
            for _ in range(steps)
        ]

        def load(
            item: tuple[NDArray[np.int64], NDArray[np.int64] | None],
        ) -> tuple[torch.Tensor, torch.Tensor | None]:
            idx, nidx = item
            x = run.reader.read([patches.samples[i] for i in idx], rng=jitter)
            if nidx is None or negatives is None:
                return x, None
            return x, run.reader.read([negatives.samples[i] for i in nidx], rng=jitter)

        for k, (x, xn) in enumerate(prefetched(load, list(zip(batches, neg_batches, strict=True)))):
            x = x.to(run.device)
            b = x.shape[0]
            v = torch.cat(
                [augment_batch(x, augment, generator=run.gen, window=window) for _ in range(2)]
            )
            if xn is not None:
                v = torch.cat(
                    [v, augment_batch(xn.to(run.device), augment, generator=run.gen, window=window)]
                )
            with run.autocast():
                pooled = enc(v)
            # the projection head and the loss in float32: bf16 logits at tau = 0.07 are
            # too coarse (issue 27: training diverged on CPUs with native bf16)
            z = head(pooled.float())
            if name == "selflearn":
                loss = nt_xent(z[:b], z[b : 2 * b], temperature=stage.temperature)
            else:
                y = labels_all[batches[k]].to(run.device)
                nb = neg_batches[k]
                loss = supcon(
                    z[: 2 * b],
                    torch.cat([y, y]),
                    negatives=None if nb is None else z[2 * b :],
                    negative_labels=(
                        None
                        if nb is None or negatives is None
                        else torch.from_numpy(negatives.labels[nb]).to(run.device)
                    ),
                    temperature=stage.temperature,
                )
            loop.step(loss, k, views=v.shape[0])
        loop.end_epoch()
    freeze(enc.trunk)
    return loop.record(len(patches))


@torch.no_grad()
def embed_patches(
    encoder: PatchEncoder,
    reader: PatchReader,
    *,
    patches: PatchSet,
    device: torch.device,
    views: int = 1,
    augment: AugmentConfig | None = None,
    gen: torch.Generator | None = None,
    jitter: np.random.Generator | None = None,
    batch_size: int = 64,
    autocast: bool = True,
) -> torch.Tensor:
    """Pooled features (views, N, D) float32 on the CPU: view 0 is the crop as it is, further
    views are augmented (``augment`` with ``gen``; ``jitter`` shifts every view's crop)."""
    encoder.eval()
    enabled = autocast and autocast_pays_off(device)
    out = []
    chunks = [patches.samples[i : i + batch_size] for i in range(0, len(patches), batch_size)]
    for x in prefetched(lambda c: reader.read(c, rng=jitter), chunks):
        x = x.to(device)
        per_view = []
        for v in range(views):
            xv = (
                x
                if v == 0 or augment is None or gen is None
                else augment_batch(x, augment, generator=gen, window=encoder.window_a)
            )
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
                per_view.append(encoder(xv).float().cpu())
        out.append(torch.stack(per_view))
    if not out:
        return torch.empty(views, 0, encoder.spec.out_channels)
    return torch.cat(out, dim=1)


def _train_linear(
    feats: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    stage: StageConfig,
    *,
    rng: np.random.Generator,
    seed: int,
    negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
    negatives_weight: float = 1.0,
    background: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Cross-entropy linear layer on (M, D) features, oversampling classes equally; returns
    (K, D) weight and (K,) bias acting on the raw features (standardisation folded in).

    ``negatives`` = ((R, D) features, (R,) class indices) of suggestions the user rejected for
    that class: each step adds ``negatives_weight`` x :func:`not_class_loss` (background over
    the rejected class, class ``background`` = the last by default), so flagged look-alikes push
    the head away from them."""
    mu = feats.mean(dim=0)
    sd = feats.std(dim=0).clamp_min(1e-6)
    xs = (feats - mu) / sd
    xn, yn = None, None
    if negatives is not None and len(negatives[1]):
        xn, yn = (negatives[0] - mu) / sd, negatives[1]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        layer = nn.Linear(feats.shape[1], n_classes)
    _init_linear(layer, gen)
    opt = torch.optim.Adam(layer.parameters(), lr=stage.lr)
    sched = (
        torch.optim.lr_scheduler.StepLR(opt, step_size=stage.decay_epoch, gamma=stage.decay_factor)
        if stage.decay_epoch
        else None
    )
    counts = torch.bincount(labels, minlength=n_classes).double()
    p = (1.0 / counts[labels]).numpy()
    p = p / p.sum()
    steps = stage.steps_per_epoch(len(labels))
    losses = []
    for _ in range(stage.epochs):
        total = 0.0
        for _ in range(steps):
            idx = torch.from_numpy(rng.choice(len(labels), size=stage.batch_size, p=p))
            loss = F.cross_entropy(layer(xs[idx]), labels[idx])
            if xn is not None and yn is not None:
                jdx = torch.from_numpy(rng.choice(len(yn), size=stage.batch_size))
                not_c = not_class_loss(layer(xn[jdx]), yn[jdx], background=background % n_classes)
                loss = loss + negatives_weight * not_c
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += float(loss.detach())
        losses.append(total / steps)
        if sched is not None:
            sched.step()
    w = layer.weight.detach() / sd
    b = layer.bias.detach() - w @ mu
    return w, b, [round(v, 5) for v in losses]


def not_class_loss(logits: torch.Tensor, labels: torch.Tensor, *, background: int) -> torch.Tensor:
    """Mean ``softplus(z_y - z_bg)`` of (N, K) logits: each sample, known *not* to be its (N,)
    class ``y``, should score background above ``y`` (the two-way cross-entropy between them).
    It says nothing about the other classes, so a look-alike of one class is not pushed into
    another."""
    rows = torch.arange(len(labels))
    return F.softplus(logits[rows, labels] - logits[:, background]).mean()


# --- metrics ------------------------------------------------------------------------------------
def classification_metrics(
    probs: NDArray[np.float32], labels: NDArray[np.int64], *, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class precision/recall/F1 and the confusion matrix
    (rows = truth) of argmax predictions; ``probs`` (N, K), ``labels`` (N,)."""
    k = len(classes)
    pred = probs.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    per_class = {}
    recalls = []
    for c, name in enumerate(classes):
        tp = confusion[c, c]
        support = confusion[c].sum()
        predicted = confusion[:, c].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": round(float(precision), 4),
            "recall": round(float(recall), 4),
            "f1": round(float(f1), 4),
            "support": int(support),
        }
        if support:
            recalls.append(recall)
    return {
        "n": len(labels),
        "accuracy": round(float((pred == labels).mean()), 4) if len(labels) else None,
        "balanced_accuracy": round(float(np.mean(recalls)), 4) if recalls else None,
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def pick_thresholds(
    probs: NDArray[np.float32], labels: NDArray[np.int64], *, classes: Sequence[str]
) -> dict[str, float]:
    """Per class, the confidence threshold (on the class probability of windows predicted as
    that class) that maximises F1 on held-out patches; the middle of the best range."""
    pred = probs.argmax(axis=1)
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2)
    out = {}
    for c, name in enumerate(classes):
        truth = labels == c
        f1s = []
        for t in grid:
            hit = (pred == c) & (probs[:, c] >= t)
            tp = float((hit & truth).sum())
            denom = float(hit.sum() + truth.sum())
            f1s.append(2 * tp / denom if denom else 0.0)
        f1 = np.asarray(f1s)
        best = np.flatnonzero(f1 >= f1.max() - 1e-9)
        out[name] = float(grid[best[len(best) // 2]]) if f1.max() > 0 else DEFAULT_CONFIDENCE
    return out


def detection_scores(probs: NDArray[np.floating], classes: Sequence[str]) -> NDArray[np.float64]:
    """(N, K) each window's probability of the most probable of the user's classes in that
    class's column, 0 elsewhere (background's column 0): what
    :func:`simsearch_wsi.infer.dense.detect` compares with a class's threshold."""
    p = np.asarray(probs, dtype=np.float64)
    fg = np.array([c != BACKGROUND_CLASS for c in classes])
    out = np.zeros_like(p)
    if len(p) and fg.any():
        best = np.where(fg[None, :], p, -1.0).argmax(axis=1)
        rows = np.arange(len(p))
        out[rows, best] = p[rows, best]
    return out


def _logit(p: float) -> float:
    q = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(q / (1 - q))


def tail_thresholds(evidence: ThresholdEvidence) -> dict[str, dict[str, float]]:
    """Per user class with labelled positives and unlabelled windows in ``evidence``: the
    threshold between where its labelled positives sit and where the background's upper tail
    sits, in logit space, nearer the positives (``tail`` rule, :data:`THRESHOLD_RULES`).

    ``z = w logit(P) + (1 - w) logit(B)``, threshold ``sigmoid(z)`` clipped to
    [:data:`TAIL_MIN`, :data:`TAIL_MAX`], where ``P`` is the :data:`TAIL_POSITIVE_QUANTILE`
    quantile of the class's held-out and leave-one-out positives' detection scores
    (:func:`detection_scores`), ``B`` the :data:`TAIL_BACKGROUND_QUANTILE` quantile of the
    unlabelled windows' (at least :data:`TAIL_BACKGROUND_FLOOR`) and ``w`` =
    :data:`TAIL_POSITIVE_WEIGHT`. A handful of held-out patches picked thresholds in the
    middle of a wide best-F1 range, far below the positives and too low for a new slide's
    look-alikes, or fell back to 0.5 where a weak class needs less; the leave-one-out
    positives exist without a held-out split and the unlabelled windows show how high a
    slide's background goes. Returns ``{class: {"threshold", "positives", "positive_q",
    "background_q"}}``; classes without positives or windows are left out."""
    classes = evidence.classes
    if evidence.unlabelled_probs is None or not len(evidence.unlabelled_probs):
        return {}
    held = detection_scores(evidence.val_probs, classes)
    loo = detection_scores(evidence.loo_probs, classes) if evidence.loo_probs is not None else None
    unl = detection_scores(evidence.unlabelled_probs, classes)
    out: dict[str, dict[str, float]] = {}
    for k, name in enumerate(classes):
        if name == BACKGROUND_CLASS:
            continue
        pos = held[evidence.val_labels == k, k]
        if loo is not None and evidence.loo_labels is not None:
            pos = np.concatenate([pos, loo[evidence.loo_labels == k, k]])
        if not len(pos):
            continue
        p_q = float(np.quantile(pos, TAIL_POSITIVE_QUANTILE))
        b_q = max(float(np.quantile(unl[:, k], TAIL_BACKGROUND_QUANTILE)), TAIL_BACKGROUND_FLOOR)
        z = TAIL_POSITIVE_WEIGHT * _logit(p_q) + (1 - TAIL_POSITIVE_WEIGHT) * _logit(b_q)
        t = float(np.clip(1 / (1 + math.exp(-z)), TAIL_MIN, TAIL_MAX))
        out[name] = {
            "threshold": round(t, 4),
            "positives": len(pos),
            "positive_q": round(p_q, 4),
            "background_q": round(b_q, 4),
        }
    return out


def _probs(w: torch.Tensor, b: torch.Tensor, feats: torch.Tensor) -> NDArray[np.float32]:
    out: NDArray[np.float32] = torch.softmax(feats @ w.T + b, dim=1).numpy()
    return out


# --- the whole run ------------------------------------------------------------------------------
class SearchView(Protocol):
    """The similarity search a model is trained next to: its normalised window vectors of any
    labelled patch (what :mod:`simsearch_wsi.search.probe` fits on) and what defines them."""

    feature_norm: str
    weights: WeightsInfo

    def vectors(self, patches: PatchSet, rotations: int = 1) -> torch.Tensor:
        """(rotations, N, D) unit vectors of each patch's window turned by 0, 90, 180, 270
        degrees (the first ``rotations`` of them)."""
        ...

    def unlabelled_vectors(
        self, images: Sequence[str], n: int, *, rng: np.random.Generator
    ) -> torch.Tensor:
        """(n', D) unit vectors of up to ``n`` windows drawn at random among the embedded
        windows of ``images`` (as the model will see them when applied densely)."""
        ...

    def unlabelled_patches(
        self, images: Sequence[str], n: int, *, classes: Sequence[str], rng: np.random.Generator
    ) -> PatchSet:
        """Up to ``n`` patches (labelled background, of ``classes``) centred on windows drawn
        at random among the embedded windows of ``images``."""
        ...

    def with_trunk(self, trunk: nn.Module, identity: str) -> SearchView:
        """The same view (pooling, feature normalisation, patch geometry) over another trunk
        of the same backbone; ``identity`` names its weights (feature caches are keyed on it)."""
        ...


@dataclass(frozen=True)
class ThresholdEvidence:
    """What a run's confidence thresholds were picked from (not stored in the bundle):
    ``val_probs`` (N, K) the chosen model's probabilities of the ``val_labels`` (N,) held-out
    patches, and ``unlabelled_probs`` (U, K) its probabilities of the unlabelled windows drawn
    from the reviewed images that calibrated its search head(s) (``None`` for the linear head).
    For the ensemble both are the two heads' combined probabilities."""

    classes: tuple[str, ...]
    val_probs: NDArray[np.float32]
    val_labels: NDArray[np.int64]
    unlabelled_probs: NDArray[np.float32] | None = None
    #: (M, K) the chosen search head(s)' leave-one-out probabilities of the ``loo_labels``
    #: (M,) patches they were fitted on (each scored without its own memory entries; the
    #: calibration saw them); ``None`` for the linear head
    loo_probs: NDArray[np.float32] | None = None
    loo_labels: NDArray[np.int64] | None = None


@dataclass
class TrainResult:
    bundle: ModelBundle
    metrics: dict[str, Any]
    notes: list[str]
    #: the held-out, leave-one-out and unlabelled evidence the thresholds were picked from
    #: (None for the linear head without held-out patches; a search head always has its
    #: leave-one-out probabilities)
    evidence: ThresholdEvidence | None = None


@dataclass
class _Candidate:
    """One model of a run: its kind (``search``: the search head on the search's trunk,
    ``trunk``: the fine-tuned trunk's linear head, ``tuned-search``: the search head on the
    fine-tuned trunk), its head, held-out probabilities, and the view a search head reads."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor
    val_probs: NDArray[np.float32] | None
    val_ap: float = float("nan")
    #: (U, K) probabilities of the judge's unlabelled patches (``auto``, :func:`_select`)
    judge_probs: NDArray[np.float32] | None = None
    memory: MemoryHead | None = None
    view: SearchView | None = None
    #: (U, D) the unlabelled windows that calibrated a search head (reused when it is refitted)
    unlabelled: torch.Tensor | None = None
    #: (U, K) the head's probabilities of those windows
    unlabelled_probs: NDArray[np.float32] | None = None
    #: (N, K) leave-one-out probabilities of the patches the head was fitted on
    loo_probs: NDArray[np.float32] | None = None

    @property
    def head_input(self) -> str:
        """What the bundle's head reads: ``search`` (window vectors) or ``trunk``."""
        return "trunk" if self.kind == "trunk" else "search"


def _state_identity(module: nn.Module) -> str:
    """A name for ``module``'s weights: a digest of its state (feature caches are keyed on
    it, so maps of a fine-tuned trunk never mix with the search's)."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return f"tuned:{digest.hexdigest()[:16]}"


def _memory_weight(memory: MemoryHead) -> torch.Tensor:
    """(K, 2) the bundle's ``head_weight`` of a search head: ``a_c`` and ``g_c``."""
    g = memory.neg_weight if memory.neg_weight is not None else torch.zeros_like(memory.scale)
    return torch.stack([memory.scale, g], dim=1)


def _fit_search_head(
    view: SearchView,
    train_set: PatchSet,
    negatives: PatchSet | None,
    classes: Sequence[str],
    unlabelled: torch.Tensor | None = None,
) -> MemoryHead:
    """The search head on ``view``'s vectors of ``train_set`` and the user's rejected
    suggestions, each in its 4 rotations (as the search embeds prototypes), calibrated also on
    the ``unlabelled`` window vectors (U, D) when given."""
    n_off = MEMORY_ROTATIONS
    xs = view.vectors(train_set, n_off)
    ids = np.tile(np.arange(len(train_set)), n_off)
    xn, yn, idn = None, None, None
    if negatives is not None and len(negatives):
        xn = view.vectors(negatives, n_off).reshape(-1, xs.shape[-1])
        yn = np.tile(negatives.labels, n_off)
        idn = np.tile(np.arange(len(negatives)), n_off)
    background = list(classes).index(BACKGROUND_CLASS) if BACKGROUND_CLASS in classes else -1
    return fit_memory_head(
        xs.reshape(-1, xs.shape[-1]),
        np.tile(train_set.labels, n_off),
        sample_ids=ids,
        n_classes=len(classes),
        background=background,
        negatives=xn,
        negative_labels=yn,
        negative_ids=idn,
        unlabelled=unlabelled,
    )


def _similarity_expert(memory: MemoryHead, patches: PatchSet) -> tuple[torch.Tensor, MemoryHead]:
    """The similarity expert of a search head fitted on ``patches`` (:func:`_fit_search_head`:
    its memory starts with their vectors in ``MEMORY_ROTATIONS`` rotations, rotation-major):
    the (M,) bool mask of the memory entries of the user's prototypes and the expert as a
    :class:`MemoryHead` on them (:func:`simsearch_wsi.train.ensemble.similarity_expert_head`;
    its thresholds' evidence: :func:`_similarity_expert_evidence`)."""
    n = len(patches)
    entry = torch.arange(len(memory.vectors))
    is_prototype = torch.tensor([s.source == "prototype" for s in patches.samples])
    mask = (entry < MEMORY_ROTATIONS * n) & is_prototype[entry % n]
    weight, bias = similarity_expert_head(
        memory.n_classes,
        memory.background,
        temperature=SIMILARITY_EXPERT_TEMPERATURE,
        ceiling=SIMILARITY_EXPERT_CEILING,
    )
    expert = MemoryHead(
        memory.vectors[mask],
        memory.owner[mask],
        weight[:, 0],
        bias,
        memory.background,
        weight[:, 1],
    )
    return mask, expert


def _similarity_expert_evidence(
    memory: MemoryHead,
    view: SearchView,
    train_set: PatchSet,
    val_set: PatchSet | None,
    *,
    unlabelled: torch.Tensor | None,
) -> tuple[NDArray[np.float32] | None, NDArray[np.float32] | None, NDArray[np.float32]]:
    """The similarity expert's (N_val, K) held-out, (U, K) unlabelled and (N, K) leave-one-out
    probabilities (``None`` without held-out patches or unlabelled windows), for the
    thresholds' evidence. ``memory``: a search head fitted on ``train_set`` (its memory starts
    with their vectors in ``MEMORY_ROTATIONS`` rotations) on ``view``.

    The saved expert reads every prototype of the user (the partner is refitted on all
    labelled patches), so the evidence reads them all too, the held-out ones included (a
    class whose only prototype the split held out would otherwise have no entry, and the
    expert would score each of its windows as background), and never compares a patch with
    its own entries."""
    n = len(train_set)
    mask, expert = _similarity_expert(memory, train_set)
    vectors, owner = expert.vectors.float(), expert.owner
    sample = torch.arange(len(memory.vectors))[mask] % n  # the patch of each entry: train_set's
    held = (
        []
        if val_set is None
        else [i for i, s in enumerate(val_set.samples) if s.source == "prototype"]
    )
    if val_set is not None and held:  # ... or n + val_set's
        xs = view.vectors(val_set.subset(held), MEMORY_ROTATIONS).float()
        vectors = torch.cat([vectors, xs.reshape(-1, xs.shape[-1])])
        labels = torch.as_tensor(val_set.labels[held], dtype=owner.dtype)
        owner = torch.cat([owner, labels.repeat(MEMORY_ROTATIONS)])
        sample = torch.cat([sample, n + torch.as_tensor(held).repeat(MEMORY_ROTATIONS)])
    every = dataclasses.replace(expert, vectors=vectors, owner=owner)

    def without_own(queries: torch.Tensor, first: int) -> NDArray[np.float32]:
        own = sample[None, :] == (first + torch.arange(len(queries)))[:, None]
        logits = every.logits(*every.similarities(queries, exclude=own))
        out: NDArray[np.float32] = torch.softmax(logits, dim=1).numpy().astype(np.float32)
        return out

    loo = without_own(memory.vectors[:n], 0)
    val = None if val_set is None else without_own(view.vectors(val_set, 1)[0], n)
    unl = None if unlabelled is None or not len(unlabelled) else every.probabilities(unlabelled)
    return val, unl, loo


def _leave_one_out_probs(memory: MemoryHead, n: int) -> NDArray[np.float32]:
    """(n, K) probabilities of the ``n`` labelled patches a search head was fitted on
    (:func:`_fit_search_head`: its memory starts with their vectors in ``MEMORY_ROTATIONS``
    rotations, rotation-major), each scored at rotation 0 without its own memory entries."""
    m = len(memory.vectors)
    entry = torch.arange(m)
    own = (entry[None, :] < MEMORY_ROTATIONS * n) & (entry[None, :] % n == torch.arange(n)[:, None])
    pos, neg = memory.similarities(memory.vectors[:n], exclude=own)
    out: NDArray[np.float32] = (
        torch.softmax(memory.logits(pos, neg), dim=1).numpy().astype(np.float32)
    )
    return out


def _search_candidate(
    view: SearchView,
    train_set: PatchSet,
    val_set: PatchSet | None,
    negatives: PatchSet | None,
    classes: Sequence[str],
    *,
    kind: str,
    n_unlabelled: int = 0,
    rng: np.random.Generator | None = None,
    judge: PatchSet | None = None,
) -> _Candidate:
    """The search head on ``view`` fitted on ``train_set`` (and the rejected ``negatives``),
    with its probabilities of the held-out ``val_set`` and of the ``judge``'s unlabelled
    patches; ``kind`` as in :class:`_Candidate`."""
    unlabelled = None
    if n_unlabelled > 0:
        images = sorted({sample.image for sample in train_set.samples})
        gen = rng if rng is not None else np.random.default_rng(0)
        unlabelled = view.unlabelled_vectors(images, n_unlabelled, rng=gen)
    fitted = _fit_search_head(view, train_set, negatives, classes, unlabelled)
    probe = _Candidate(
        kind,
        _memory_weight(fitted),
        fitted.bias,
        None,
        memory=fitted,
        view=view,
        unlabelled=unlabelled,
    )
    if unlabelled is not None and len(unlabelled):
        probe.unlabelled_probs = fitted.probabilities(unlabelled)
    probe.loo_probs = _leave_one_out_probs(fitted, len(train_set))
    if val_set is not None:
        probe.val_probs = fitted.probabilities(view.vectors(val_set, 1)[0])
    if judge is not None and len(judge):
        probe.judge_probs = fitted.probabilities(view.vectors(judge, 1)[0])
    return probe


def train_patch_model(
    data: TrainingData,
    extractor: FeatureExtractor,
    *,
    config: TrainConfig,
    open_image: Callable[[str], ImageSource],
    search: SearchView | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train the model of ``config`` on ``data`` and return its bundle.

    ``config.head_input`` chooses what is trained: ``search`` fits the search head on
    ``search``'s window vectors (seconds; no trunk training), ``trunk`` runs the strategy's
    stages on ``extractor``'s trunk (a copy; the extractor and its trunk are left as they were),
    ``tuned-search`` fine-tunes the trunk, then fits the search head on the fine-tuned trunk's
    window vectors, ``ensemble`` keeps that head and the search head on ``search``'s own
    trunk as the bundle's partner (their probabilities combined per window), ``auto`` trains
    ``ensemble`` or ``trunk`` by the number of labelled patches per class and the kind of image
    (:data:`AUTO_ENSEMBLE_MIN_PER_CLASS`; a note says which and why). ``auto`` with a judge
    (``config.judge_windows > 0``, experimental) trains all three (the search head on either
    trunk and the trunk's linear head) and keeps the better search head only where its
    held-out macro average precision beats the linear head's by more than
    :data:`SELECTION_MARGIN` (``metrics["selection"]`` says which and why; without held-out
    patches it trains as ``trunk``). A search head that is kept is refitted on every clean
    patch (training + held-out). ``device`` defaults to the extractor's."""
    trunk, spec, weights = extractor.trunk, extractor.spec, extractor.weights
    device = torch.device(extractor.device if device is None else device)
    notes = list(data.notes)
    clean = data.clean
    present = [c for c, n in clean.class_counts().items() if n > 0]
    if len(present) < 2:
        raise ConfigError(
            f"training needs patches of at least two classes (the user's classes and "
            f"background); have {clean.class_counts()}. Approve suggestions, confirm background "
            "candidates, or add prototypes of another class"
        )
    head_input = config.head_input
    if search is None and head_input == "search":
        raise ConfigError(
            "head input 'search' needs the similarity search the session was reviewed with"
        )
    if search is None:
        if head_input in ("tuned-search", "ensemble"):
            notes.append("no similarity search given: the fine-tuned trunk's linear head is kept")
        head_input = "trunk"
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(child_seed(rng))
    freeze_early = weights.kind != "random"
    base_trunk = trunk
    trunk = copy.deepcopy(trunk).to(device).to(memory_format=torch.channels_last)
    freeze(trunk)
    first_image = clean.samples[0].image
    n_channels = len(data.channels)
    with open_image(first_image) as first:
        scale = AnalysisScale.for_patch(first, max(data.patch_size_l0))
    geometry = PatchGeometry.from_l0(*data.patch_size_l0, scale=scale, stride=spec.stride)
    encoder = PatchEncoder(trunk, spec, geometry=geometry, rgb=data.rgb, context_a=config.context_a)
    encoder.to(device)
    crop = CropGeometry(
        max(data.patch_size_l0), encoder.window_a, config.context_a, config.jitter_a
    )
    metrics: dict[str, Any] = {"counts": data.counts(), "stages": {}}
    judged = (
        head_input == "auto"
        and search is not None
        and config.judge_windows > 0
        and min(n for n in clean.class_counts().values() if n > 0) >= JUDGE_MIN_PER_CLASS
    )
    # with a judge, one held-out patch per class ranked among the judge's unlabelled windows
    # is enough to compare heads (thresholds still need ``min_val_per_class``, below)
    min_val = 1 if judged else config.min_val_per_class
    split = (
        stratified_split(clean, config.val_fraction, rng=rng, min_per_class=min_val)
        if config.val_fraction > 0
        else None
    )
    train_set, val_set = split if split is not None else (clean, None)
    if val_set is None:
        notes.append("too few patches per class to hold some out: no validation metrics")
    negatives = data.negatives if config.uses_negatives and len(data.negatives) else None
    if config.uses_negatives and negatives is None:
        notes.append("the session has no negatives (rejected suggestions) to train with")
    candidates: list[_Candidate] = []
    if head_input == "auto" and config.judge_windows == 0:
        head_input = _auto_head_input(
            clean.class_counts(), rgb=data.rgb, search=search, notes=notes
        )
    if head_input == "auto" and val_set is None:
        # nothing to choose by: the fine-tuned trunk's linear head, as ``trunk``
        notes.append(
            "auto: too few labelled patches to hold some out and compare heads on; trained the "
            "fine-tuned trunk's linear head (as --head-input trunk)"
        )
        head_input = "trunk"
    judge = None
    if search is not None and head_input == "auto" and config.judge_windows > 0:
        # drawn from their own stream: the heads' training draws are unchanged
        judge = search.unlabelled_patches(
            sorted({sample.image for sample in clean.samples}),
            config.judge_windows,
            classes=clean.classes,
            rng=np.random.default_rng((seed, 0x1D6E)),
        )
    if search is not None and head_input in ("auto", "search", "ensemble"):
        t0 = time.perf_counter()
        if progress is not None:
            progress("search head | fitting", 0, 1)
        probe = _search_candidate(
            search,
            train_set,
            val_set,
            negatives,
            clean.classes,
            kind="search",
            n_unlabelled=config.unlabelled_windows,
            rng=np.random.default_rng((seed, 0x5EA)),
            judge=judge,
        )
        fitted = probe.memory
        assert fitted is not None
        candidates.append(probe)
        metrics["stages"]["search_head"] = {
            "memory": len(fitted.vectors),
            "negatives": 0 if negatives is None else len(negatives),
            "scale": [round(float(v), 4) for v in fitted.scale],
            "counter_weight": [round(float(v), 4) for v in _memory_weight(fitted)[:, 1]],
            "bias": [round(float(v), 4) for v in fitted.bias],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if progress is not None:
            progress("search head | fitting", 1, 1)
    if head_input in ("auto", "trunk", "tuned-search", "ensemble"):
        if not freeze_early:
            notes.append(
                "trunk weights are random (not pretrained): all layers are trained, none frozen; "
                "use --weights imagenet or weights from `simsearch-wsi pretrain` for better models"
            )
        # tuned-search and ensemble replace the trunk's linear head with search heads: not fitted
        searched = search is not None and head_input in ("tuned-search", "ensemble")
        trunk_head = _fine_tune(
            data,
            encoder,
            crop,
            config,
            device=device,
            freeze_early=freeze_early,
            rng=rng,
            gen=gen,
            progress=progress,
            n_channels=n_channels,
            split=(train_set, val_set),
            negatives=negatives,
            metrics=metrics,
            notes=notes,
            open_image=open_image,
            judge=judge,
            linear_head=not searched,
        )
        if trunk_head is not None:
            candidates.append(trunk_head)
    if search is not None and head_input in ("auto", "tuned-search", "ensemble"):
        # the search head on the fine-tuned trunk's window vectors (in tuned-search and
        # ensemble it replaces the trunk's linear head; in auto it is one more candidate)
        tuned_view = search.with_trunk(encoder.trunk, _state_identity(encoder.trunk))
        t0 = time.perf_counter()
        probe = _search_candidate(
            tuned_view,
            train_set,
            val_set,
            negatives,
            clean.classes,
            kind="tuned-search",
            n_unlabelled=config.unlabelled_windows,
            rng=np.random.default_rng((seed, 0x5EA)),
            judge=judge,
        )
        candidates.append(probe)
        metrics["stages"]["tuned_search_head"] = {
            "memory": 0 if probe.memory is None else len(probe.memory.vectors),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    partner: _Candidate | None = None
    if head_input == "ensemble":
        # both search heads are kept: the one on the fine-tuned trunk and, as its partner,
        # the one on the search's trunk (fitted first); their held-out probabilities combine
        partner, chosen = candidates
        metrics["selection"] = {
            "asked": config.head_input,
            "kept": "tuned-search+search",
            "reason": "ensemble: the search heads on the fine-tuned and on the search's trunk, "
            "their probabilities combined (product of experts)"
            + (
                f", with the search's similarity to the prototypes as a third expert (weight "
                f"{config.similarity_expert:g})"
                if config.similarity_expert > 0
                else ""
            ),
        }
        # the similarity expert (when asked) is a third expert of every combined probability
        share = config.similarity_expert
        expert = None
        if share > 0 and partner.memory is not None and partner.view is not None:
            expert_val, expert_unl, expert_loo = _similarity_expert_evidence(
                partner.memory, partner.view, train_set, val_set, unlabelled=partner.unlabelled
            )
            expert = _Candidate(
                "similarity",
                torch.zeros(0),
                torch.zeros(0),
                expert_val,
                unlabelled_probs=expert_unl,
                loo_probs=expert_loo,
            )
        shares = None if expert is None else [1.0, 1.0, share]

        def combined(field: str) -> NDArray[np.float32] | None:
            parts = [getattr(m, field) for m in (chosen, partner, expert) if m is not None]
            if any(p is None for p in parts) or len({p.shape for p in parts}) != 1:
                return None
            return combine_experts(parts, class_axis=1, weights=shares)

        # both views draw the same unlabelled windows (same images, same seeded draw, same
        # embedded windows); combined only where they did
        chosen.val_probs, chosen.unlabelled_probs, chosen.loo_probs = (
            combined("val_probs"),
            combined("unlabelled_probs"),
            combined("loo_probs"),
        )
    else:
        chosen = _select(candidates, val_set, clean.classes, head_input, metrics, judge=judge)
    # what the user asked for, and what ``auto`` (without a judge) resolved it to
    metrics["selection"]["asked"] = config.head_input
    if head_input != config.head_input:
        metrics["selection"]["resolved"] = head_input
    if config.similarity_expert > 0 and head_input != "ensemble":
        # ``auto`` took another head: the weight asked for has nothing to apply to
        metrics["selection"]["similarity_expert"] = "not used"
        notes.append(
            f"the similarity expert (weight {config.similarity_expert:g}) was not used: it is a "
            f"third expert of the ensemble, and {config.head_input} trained the {chosen.kind} "
            f"head"
        )
    thresholds = {c: DEFAULT_CONFIDENCE for c in clean.classes}
    evidence: ThresholdEvidence | None = None
    few_held_out = val_set is not None and any(
        0 < n < config.min_val_per_class for n in val_set.class_counts().values()
    )
    if val_set is not None and chosen.val_probs is not None and not few_held_out:
        metrics["validation"] = classification_metrics(
            chosen.val_probs, val_set.labels, classes=clean.classes
        )
        thresholds = pick_thresholds(chosen.val_probs, val_set.labels, classes=clean.classes)
    if chosen.val_probs is not None or chosen.loo_probs is not None:
        k = len(clean.classes)
        evidence = ThresholdEvidence(
            tuple(clean.classes),
            np.zeros((0, k), np.float32) if chosen.val_probs is None else chosen.val_probs,
            np.asarray([] if val_set is None else val_set.labels, dtype=np.int64),
            chosen.unlabelled_probs,
            chosen.loo_probs,
            None if chosen.loo_probs is None else np.asarray(train_set.labels, dtype=np.int64),
        )
    # the tail rule (when asked): the ensemble only (it needs a search head's leave-one-out and
    # unlabelled evidence; on the single search head it lost F1 on the study's dev cases)
    tail = (
        tail_thresholds(evidence)
        if config.threshold_rule == "tail" and evidence is not None and partner is not None
        else {}
    )
    if tail:
        thresholds = {**thresholds, **{c: v["threshold"] for c, v in tail.items()}}
        notes.append(
            "confidence thresholds (tail rule): between the labelled positives' lower quartile "
            "and the unlabelled windows' 99th percentile, in logit space, at most "
            f"{TAIL_MAX:g}: " + ", ".join(f"{c} {v['threshold']:.2f}" for c, v in tail.items())
        )
    elif few_held_out:
        notes.append(
            f"fewer than {config.min_val_per_class} held-out patches of some class: they chose "
            f"the model, confidence thresholds default to {DEFAULT_CONFIDENCE}"
        )
    elif val_set is None:
        notes.append(f"confidence thresholds default to {DEFAULT_CONFIDENCE}")
    if tail:
        reason = "tail: labelled positives' lower quartile and the unlabelled windows' tail"
    elif "validation" in metrics:
        reason = f"the best F1 on {len(val_set) if val_set is not None else 0} held-out patches"
    else:
        reason = f"default {DEFAULT_CONFIDENCE}: too few held-out patches"
    metrics["thresholds"] = {
        "rule": "tail" if tail else "held-out-f1",
        "asked": config.threshold_rule,
        "reason": reason,
        "values": {c: round(float(v), 4) for c, v in thresholds.items()},
        **({"tail": tail} if tail else {}),
    }
    metrics["head_input"] = chosen.head_input
    metrics["notes"] = notes

    def make_bundle(
        model: _Candidate, partner_bundle: ModelBundle | None, metrics: dict[str, Any]
    ) -> ModelBundle:
        w, b, memory = model.weight, model.bias, model.memory
        if model.head_input == "search" and model.view is not None and val_set is not None:
            # the held-out patches chose the model and its thresholds; now they join its memory
            memory = _fit_search_head(model.view, clean, negatives, clean.classes, model.unlabelled)
            w, b = _memory_weight(memory), memory.bias
        # the search head on the search's trunk reads it unchanged; the others the fine-tuned
        # copy
        state_src = (base_trunk if model.kind == "search" else encoder.trunk).state_dict()
        return ModelBundle(
            backbone=spec.name,
            trunk_state={k: v.detach().cpu().contiguous() for k, v in state_src.items()},
            head_weight=w.contiguous(),
            head_bias=b.contiguous(),
            classes=clean.classes,
            colors={c: data.colors[c] for c in clean.classes},
            thresholds=thresholds,
            patch_size_l0=data.patch_size_l0,
            mpp=data.mpp,
            analysis_downsample=scale.downsample_x,
            context_a=config.context_a,
            geometry=geometry.to_dict(),
            normalization=data.normalization.to_dict(),
            channels=data.channels,
            rgb=data.rgb,
            strategy=config.strategy,
            config={**config.to_dict(), "seed": seed, "device": str(device)},
            metrics=metrics,
            provenance={
                **data.provenance,
                "base_weights": {"kind": weights.kind, "identity": weights.identity},
                "frozen": list(
                    ("conv1", "layer1", "layer2") if freeze_early and model.kind != "search" else ()
                ),
                # which trunk a search head reads: the search's own (its feature maps can be
                # shared with the search) or the fine-tuned copy in this bundle
                **(
                    {"search_trunk": "fine-tuned" if model.kind == "tuned-search" else "search"}
                    if model.head_input == "search"
                    else {}
                ),
            },
            head_input=model.head_input,
            feature_norm=search.feature_norm if model.head_input == "search" and search else "none",
            memory_vectors=None if memory is None else memory.vectors.to(torch.float16),
            memory_owner=None if memory is None else memory.owner,
            partner=partner_bundle,
        )

    partner_bundle = None if partner is None else make_bundle(partner, None, {})
    if partner_bundle is not None and config.similarity_expert > 0:
        # the partner's memory (refitted on every clean patch) read as the similarity expert
        mask, expert_head = _similarity_expert(
            MemoryHead(
                partner_bundle.memory_vectors.float(),  # type: ignore[union-attr]
                partner_bundle.memory_owner,  # type: ignore[arg-type]
                partner_bundle.head_weight[:, 0],
                partner_bundle.head_bias,
                list(clean.classes).index(BACKGROUND_CLASS),
            ),
            clean,
        )
        partner_bundle = dataclasses.replace(
            partner_bundle,
            expert_mask=mask,
            expert_weight=_memory_weight(expert_head).contiguous(),
            expert_bias=expert_head.bias.contiguous(),
            expert_share=float(config.similarity_expert),
        )
    return TrainResult(make_bundle(chosen, partner_bundle, metrics), metrics, notes, evidence)


def _auto_head_input(
    counts: dict[str, int], *, rgb: bool, search: SearchView | None, notes: list[str]
) -> str:
    """What ``auto`` trains without a judge (:data:`AUTO_ENSEMBLE_MIN_PER_CLASS`), with a note
    saying why."""
    fewest = min(n for n in counts.values() if n > 0)
    if fewest < AUTO_ENSEMBLE_MIN_PER_CLASS:
        notes.append(
            f"auto: too few labelled patches for the search heads ({fewest} in a class, "
            f"{AUTO_ENSEMBLE_MIN_PER_CLASS} needed); trained the fine-tuned trunk's linear "
            "head (as --head-input trunk)"
        )
        return "trunk"
    if search is None or not rgb:
        notes.append(
            "auto: "
            + ("no similarity search given" if search is None else "not brightfield RGB")
            + ": trained the fine-tuned trunk's linear head (as --head-input trunk)"
        )
        return "trunk"
    notes.append(
        f"auto: {fewest} or more labelled patches per class on brightfield: trained the "
        "ensemble of the search heads on the fine-tuned and on the search's trunk (as "
        "--head-input ensemble)"
    )
    return "ensemble"


def _select(
    candidates: list[_Candidate],
    val_set: PatchSet | None,
    classes: Sequence[str],
    head_input: str,
    metrics: dict[str, Any],
    *,
    judge: PatchSet | None = None,
) -> _Candidate:
    """The candidate to keep (see :func:`train_patch_model`); records why in
    ``metrics["selection"]``.

    Each candidate is scored by the macro average precision of ranking the held-out patches
    by class probability. With a ``judge`` (unlabelled patches of the reviewed images, taken
    as background), they are ranked among those too: held-out positives and approved
    suggestions are easy for every head, the slide's other windows are where heads differ
    (a head that calls moderately similar tissue its class loses there, as on a new slide)."""
    if val_set is not None:
        labels = val_set.labels
        bg = list(classes).index(BACKGROUND_CLASS) if BACKGROUND_CLASS in classes else -1
        use_judge = judge is not None and len(judge) > 0 and bg >= 0
        if use_judge:
            assert judge is not None
            labels = np.concatenate([labels, np.full(len(judge), bg, dtype=np.int64)])
        for c in candidates:
            if c.val_probs is None or (use_judge and c.judge_probs is None):
                continue
            probs = c.val_probs
            if use_judge:
                assert c.judge_probs is not None
                probs = np.concatenate([c.val_probs, c.judge_probs])
            c.val_ap = macro_average_precision(
                probs, labels, classes=classes, skip=BACKGROUND_CLASS
            )
    record: dict[str, Any] = {
        "asked": head_input,
        "validation_ap": {
            c.kind: None if math.isnan(c.val_ap) else round(c.val_ap, 4) for c in candidates
        },
        "margin": SELECTION_MARGIN,
        "judge_windows": 0 if judge is None else len(judge),
    }
    if len(candidates) == 1:
        chosen = candidates[0]
        record["reason"] = f"only the {chosen.kind} model was trained"
    else:
        # the fine-tuned trunk's linear head is kept unless a search head beats it clearly
        base = next(c for c in candidates if c.kind == "trunk")
        others = [c for c in candidates if c.kind != "trunk"]
        best = max(others, key=lambda c: -math.inf if math.isnan(c.val_ap) else c.val_ap)
        what = "search head" if best.kind == "search" else "search head on the fine-tuned trunk"
        if math.isnan(best.val_ap) or math.isnan(base.val_ap):
            chosen = base
            record["reason"] = "no held-out patches to compare on: kept the fine-tuned trunk"
        elif best.val_ap > base.val_ap + SELECTION_MARGIN:
            chosen = best
            record["reason"] = (
                f"the {what} beat the fine-tuned trunk on held-out patches "
                f"({best.val_ap:.3f} > {base.val_ap:.3f} + {SELECTION_MARGIN})"
            )
        else:
            chosen = base
            record["reason"] = (
                f"the {what} did not beat the fine-tuned trunk by more than "
                f"{SELECTION_MARGIN} on held-out patches ({best.val_ap:.3f} vs "
                f"{base.val_ap:.3f}): kept the fine-tuned trunk"
            )
    record["kept"] = chosen.kind
    metrics["selection"] = record
    return chosen


def _fine_tune(
    data: TrainingData,
    encoder: PatchEncoder,
    crop: CropGeometry,
    config: TrainConfig,
    *,
    device: torch.device,
    freeze_early: bool,
    rng: np.random.Generator,
    gen: torch.Generator,
    progress: ProgressFn | None,
    n_channels: int,
    split: tuple[PatchSet, PatchSet | None],
    negatives: PatchSet | None,
    metrics: dict[str, Any],
    notes: list[str],
    open_image: Callable[[str], ImageSource],
    judge: PatchSet | None = None,
    linear_head: bool = True,
) -> _Candidate | None:
    """The paper's stages on ``encoder``'s trunk (in place): a baseline linear probe,
    self-learning, supervised contrastive, then the linear head (with its probabilities of
    the held-out ``val_set`` and of the ``judge``'s unlabelled patches); ``None`` without the
    linear head (``linear_head=False``: the caller keeps search heads on the trunk)."""
    train_set, val_set = split
    clean = data.clean
    lin_cfg = config.linear
    with PatchReader(
        crop, data.normalization, channels=data.channels, open_image=open_image
    ) as reader:
        run = TrainRun(
            encoder, reader, config, device, freeze_early, rng, gen, progress, n_channels
        )

        def views_of(patches: PatchSet) -> tuple[torch.Tensor, torch.Tensor]:
            """(M, D) features of ``config.linear_views`` augmented views of each patch and
            their (M,) labels."""
            feats = embed_patches(
                encoder,
                reader,
                patches=patches,
                device=device,
                views=config.linear_views,
                augment=config.clean_augment,
                gen=gen,
                jitter=np.random.default_rng(child_seed(rng)),
                autocast=config.autocast,
            )
            labels = torch.from_numpy(patches.labels).repeat(config.linear_views)
            return feats.reshape(-1, feats.shape[-1]), labels

        def fit_linear(tag: str) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
            feats, labels = views_of(train_set)
            rejected = None
            if negatives is not None and config.linear_negatives > 0:
                rejected = views_of(negatives)
            if progress is not None:
                progress(f"{tag} | fitting", 1, 1)
            return _train_linear(
                feats,
                labels,
                len(clean.classes),
                lin_cfg,
                rng=rng,
                seed=child_seed(rng),
                negatives=rejected,
                negatives_weight=config.linear_negatives,
            )

        if val_set is not None:
            w0, b0, _ = fit_linear("baseline linear probe")
            val_feats_before = embed_patches(
                encoder, reader, patches=val_set, device=device, autocast=config.autocast
            )[0]
            metrics["baseline_validation"] = classification_metrics(
                _probs(w0, b0, val_feats_before), val_set.labels, classes=clean.classes
            )
        # the trunk that feeds search heads is turned less (their memory holds the rotations)
        noisy_augment, clean_augment = config.stage_augments(search_heads=not linear_head)
        metrics["precision"] = "bf16" if run.bf16 else "fp32"
        metrics["rotate_deg"] = {
            "selflearn": noisy_augment.rotate_deg,
            "supcon": clean_augment.rotate_deg,
        }
        if config.uses_selflearn:
            if len(data.noisy) >= 2:
                metrics["stages"]["selflearn"] = contrastive_stage(
                    run,
                    "selflearn",
                    patches=data.noisy,
                    stage=config.selflearn,
                    augment=noisy_augment,
                )
            else:
                notes.append("no noisy patches were mined: the self-learning stage was skipped")
        metrics["stages"]["supcon"] = contrastive_stage(
            run,
            "supcon",
            patches=train_set,
            stage=config.supcon,
            augment=clean_augment,
            negatives=negatives,
        )
        if not linear_head:
            # tuned-search and ensemble keep search heads on this trunk, not its linear head
            return None
        t0 = time.perf_counter()
        w, b, lin_losses = fit_linear("linear")
        metrics["stages"]["linear"] = {
            "epochs": lin_cfg.epochs,
            "loss": lin_losses,
            "views": len(train_set) * config.linear_views,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        val_probs = None
        if val_set is not None:
            val_feats = embed_patches(
                encoder, reader, patches=val_set, device=device, autocast=config.autocast
            )[0]
            val_probs = _probs(w, b, val_feats)
            metrics["trunk_validation"] = classification_metrics(
                val_probs, val_set.labels, classes=clean.classes
            )
        judge_probs = None
        if judge is not None and len(judge):
            judge_feats = embed_patches(
                encoder, reader, patches=judge, device=device, autocast=config.autocast
            )[0]
            judge_probs = _probs(w, b, judge_feats)
    return _Candidate("trunk", w, b, val_probs, judge_probs=judge_probs)
