"""The paper's ablation: strategies x P prototypes x N negatives, repeated with seeds.

For each (P, N, repeat) the simulated user (:mod:`simsearch_wsi.eval.user`) reviews the
benchmark's review images once, and every strategy is run on that same review (paired
comparisons): ``search`` scores the similarity search alone (suggestions on the test images
ranked by cosine similarity to the prototypes); the training strategies (``pos``, ``pos+neg``,
``pos+selflearn``, ``pos+neg+selflearn``) train a model from the review session and score its
detections on the test images, ranked by class probability. Both give PR-AUC per class with the
paper's matching (:mod:`simsearch_wsi.eval.metrics`); trained models also give segmentation IoU
at their picked thresholds where the test truth has a mask.

Prototypes depend on (seed, repeat, P) only, so N = 0 and N = 5 of one repeat start from the
same prototypes. Each finished run is written to ``runs/<key>.json`` (atomically) with the
settings it used; a re-run with the same settings reuses it, so a long ablation can be
stopped and resumed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simsearch_wsi.core.atomic import write_json_atomic
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.eval.benchmark import Benchmark
from simsearch_wsi.eval.metrics import ClassPR, class_pr, paper_match_radius_l0, pool_class_pr
from simsearch_wsi.eval.thresholded import DetectionScore, segmentation_iou_on_truth
from simsearch_wsi.eval.truth import GroundTruth
from simsearch_wsi.eval.user import NO_THRESHOLD, ReviewOutcome, UserConfig, simulate_review
from simsearch_wsi.features.extractor import ProgressFn
from simsearch_wsi.infer.dense import ClassMaps, PatchModel, dense_class_maps, detect, segment
from simsearch_wsi.io.base import ImageSource
from simsearch_wsi.review.data import train_session
from simsearch_wsi.review.session import Session
from simsearch_wsi.search.engine import SimSearch
from simsearch_wsi.search.similarity import Prototype
from simsearch_wsi.train.choices import STRATEGIES
from simsearch_wsi.train.fit import TrainConfig

__all__ = [
    "ALL_STRATEGIES",
    "SEARCH_STRATEGY",
    "AblationConfig",
    "ClassScore",
    "RunResult",
    "RunSpec",
    "run_ablation",
    "run_specs",
]

#: the strategy that scores the similarity search alone (no training)
SEARCH_STRATEGY = "search"
ALL_STRATEGIES = (SEARCH_STRATEGY, *STRATEGIES)
RUN_VERSION = 1

OpenImage = Callable[[str | os.PathLike[str]], ImageSource]


@dataclass(frozen=True)
class AblationConfig:
    """The grid and how each run trains: ``strategies`` x ``prototypes`` (P values) x
    ``negatives`` (N values) x ``repeats``; ``preset`` names the training preset."""

    strategies: tuple[str, ...] = ALL_STRATEGIES
    prototypes: tuple[int, ...] = (5, 10)
    negatives: tuple[int, ...] = (0, 5)
    repeats: int = 3
    seed: int = 0
    preset: str = "fast"
    background: int = 8

    def __post_init__(self) -> None:
        # a value given twice would count as extra repeats in the summary
        for name in ("strategies", "prototypes", "negatives"):
            object.__setattr__(self, name, tuple(dict.fromkeys(getattr(self, name))))
        if self.seed < 0:
            raise ConfigError(f"the seed must be >= 0, got {self.seed}")
        unknown = [s for s in self.strategies if s not in ALL_STRATEGIES]
        if unknown or not self.strategies:
            raise ConfigError(
                f"unknown strategy {unknown or '(none given)'}; use {', '.join(ALL_STRATEGIES)}"
            )
        if not self.prototypes or min(self.prototypes) < 1:
            raise ConfigError(f"P values must be >= 1, got {list(self.prototypes)}")
        if not self.negatives or min(self.negatives) < 0:
            raise ConfigError(f"N values must be >= 0, got {list(self.negatives)}")
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategies": list(self.strategies),
            "prototypes": list(self.prototypes),
            "negatives": list(self.negatives),
            "repeats": self.repeats,
            "seed": self.seed,
            "preset": self.preset,
            "background": self.background,
        }


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid."""

    strategy: str
    prototypes: int
    negatives: int
    repeat: int
    seed: int

    @property
    def key(self) -> str:
        """A file-name-safe id, e.g. ``pos-neg_P5_N0_r1``."""
        name = self.strategy.replace("+", "-")
        return f"{name}_P{self.prototypes}_N{self.negatives}_r{self.repeat}"

    @property
    def review_key(self) -> str:
        """The review this run shares with the other strategies."""
        return f"P{self.prototypes}_N{self.negatives}_r{self.repeat}"

    def user_rng(self) -> np.random.Generator:
        """The simulated user's generator: the same prototypes for every N of a repeat."""
        return np.random.default_rng([self.seed, self.repeat, self.prototypes])

    @property
    def train_seed(self) -> int:
        return self.seed * 1000 + self.repeat


def run_specs(config: AblationConfig) -> list[RunSpec]:
    """The grid in run order: per repeat, P and N, every strategy (so a stopped ablation has
    whole repeats done)."""
    return [
        RunSpec(s, p, n, r, config.seed)
        for r in range(config.repeats)
        for p in config.prototypes
        for n in config.negatives
        for s in config.strategies
    ]


@dataclass(frozen=True)
class ClassScore:
    """One class of one run: PR-AUC over the test images, counts, IoU (NaN if none), and the
    detection F1 at the model's thresholds (NaN for the search)."""

    class_name: str
    ap: float
    n_true: int
    n_pred: int
    n_tp: int
    iou: float
    f1: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "class": self.class_name,
            "ap": None if math.isnan(self.ap) else self.ap,
            "n_true": self.n_true,
            "n_pred": self.n_pred,
            "n_tp": self.n_tp,
            "iou": None if math.isnan(self.iou) else self.iou,
            "f1": None if math.isnan(self.f1) else self.f1,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassScore:
        def num(v: Any) -> float:
            return math.nan if v is None else float(v)

        return cls(
            d["class"],
            num(d["ap"]),
            d["n_true"],
            d["n_pred"],
            d["n_tp"],
            num(d["iou"]),
            num(d.get("f1")),
        )


@dataclass
class RunResult:
    """What one run measured."""

    spec: RunSpec
    scores: list[ClassScore]
    review: dict[str, Any]
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    reused: bool = False

    @property
    def mean_ap(self) -> float:
        aps = [s.ap for s in self.scores if not math.isnan(s.ap)]
        return float(np.mean(aps)) if aps else math.nan

    @property
    def mean_iou(self) -> float:
        ious = [s.iou for s in self.scores if not math.isnan(s.iou)]
        return float(np.mean(ious)) if ious else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": {
                "strategy": self.spec.strategy,
                "prototypes": self.spec.prototypes,
                "negatives": self.spec.negatives,
                "repeat": self.spec.repeat,
                "seed": self.spec.seed,
            },
            "scores": [s.to_dict() for s in self.scores],
            "review": self.review,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            "notes": self.notes,
        }


# --- scoring ------------------------------------------------------------------------------------
def _pooled(parts: dict[str, list[ClassPR]], classes: Sequence[str]) -> dict[str, ClassPR]:
    return {c: pool_class_pr(parts[c]) for c in classes}


def score_search(
    search: SimSearch,
    benchmark: Benchmark,
    *,
    prototypes: Sequence[Prototype],
    open_image: OpenImage,
    radius_l0: float,
    progress: ProgressFn | None = None,
) -> list[ClassScore]:
    """PR-AUC of the search alone on the test images: every local maximum is a detection,
    ranked by its similarity."""
    parts: dict[str, list[ClassPR]] = {c: [] for c in benchmark.classes}
    size = benchmark.patch_size_l0
    for t in benchmark.test:
        with open_image(t.path) as image:
            result = search.suggest(
                image,
                prototypes,
                thresholds=dict.fromkeys(benchmark.classes, NO_THRESHOLD),
                patch_size_l0=(size, size),
                progress=progress,
            )
        for c in benchmark.classes:
            parts[c].append(
                class_pr(
                    result.suggestions,
                    t.truth,
                    class_name=c,
                    max_distance_l0=radius_l0,
                    score=lambda s: float(s.similarity),
                )
            )
    pooled = _pooled(parts, benchmark.classes)
    return [ClassScore(c, r.ap, r.n_true, r.n_pred, r.n_tp, math.nan) for c, r in pooled.items()]


def score_model(
    model: PatchModel,
    benchmark: Benchmark,
    *,
    open_image: OpenImage,
    radius_l0: float,
    progress: ProgressFn | None = None,
    spacing_patches: float = 1.0,
) -> list[ClassScore]:
    """PR-AUC of the model's detections on the test images (every local maximum of a class's
    log-odds map where it is the most probable class, ``spacing_patches`` patch widths apart,
    ranked by its score, :func:`~simsearch_wsi.infer.dense.ranking_scores`), and segmentation
    IoU at the model's thresholds against test truth with a mask (:func:`score_class_maps` on
    the model's maps of each test image)."""
    maps = []
    for t in benchmark.test:
        with open_image(t.path) as image:
            maps.append(dense_class_maps(image, model, progress=progress))
    return score_class_maps(
        maps,
        [t.truth for t in benchmark.test],
        classes=benchmark.classes,
        thresholds=model.bundle.thresholds,
        radius_l0=radius_l0,
        spacing_patches=spacing_patches,
    )


def score_class_maps(
    maps: Sequence[ClassMaps],
    truths: Sequence[GroundTruth],
    *,
    classes: Sequence[str],
    thresholds: dict[str, float],
    radius_l0: float,
    spacing_patches: float = 1.0,
) -> list[ClassScore]:
    """Per class of ``classes``: PR-AUC of the detections on the class maps of the test images
    (one :class:`ClassMaps` per truth), detection F1 at ``thresholds`` and segmentation IoU at
    ``thresholds`` (mean over the truths with a mask). Scoring the same maps at several
    thresholds compares threshold rules on one model."""
    parts: dict[str, list[ClassPR]] = {c: [] for c in classes}
    kept: dict[str, list[ClassPR]] = {c: [] for c in classes}
    inter: dict[str, list[float]] = {c: [] for c in classes}
    for m, truth in zip(maps, truths, strict=True):
        detections = detect(m, dict.fromkeys(m.classes, 0.0), spacing_patches=spacing_patches)
        at_thresholds = detect(m, thresholds, spacing_patches=spacing_patches)
        for c in classes:
            for out, found in ((parts, detections), (kept, at_thresholds)):
                out[c].append(
                    class_pr(
                        found,
                        truth,
                        class_name=c,
                        max_distance_l0=radius_l0,
                        score=lambda d: float(d.score),  # the detection's score (detect)
                    )
                )
        if truth.mask is not None:
            seg = segment(m, thresholds)
            iou = segmentation_iou_on_truth(
                seg.labels, classes=seg.classes, downsample=seg.downsample, truth=truth
            )
            for c in classes:
                if c in iou:
                    inter[c].append(iou[c])
    pooled = _pooled(parts, classes)
    thresholded = _pooled(kept, classes)
    return [
        ClassScore(
            c,
            r.ap,
            r.n_true,
            r.n_pred,
            r.n_tp,
            float(np.nanmean(inter[c])) if any(not math.isnan(v) for v in inter[c]) else math.nan,
            _f1(thresholded[c]),
        )
        for c, r in pooled.items()
    ]


def _f1(r: ClassPR) -> float:
    """F1 of all of a class's detections (NaN without true objects)."""
    if not r.n_true:
        return math.nan
    return DetectionScore(r.class_name, r.n_tp, r.n_pred, r.n_true).f1


# --- the grid -----------------------------------------------------------------------------------
def _train_config(preset: str, strategy: str) -> TrainConfig:
    """The paper's model for a strategy: the preset with the fine-tuned trunk's linear head
    (the ablation compares the paper's strategies; the package's default head, ``auto``, may
    train an ensemble of search heads instead, docs/evaluation.md "Training study")."""
    return TrainConfig.preset_config(preset, strategy=strategy).replace(head_input="trunk")


def _settings(
    benchmark: Benchmark, config: AblationConfig, search: SimSearch, spec: RunSpec
) -> dict[str, Any]:
    """What a finished run must match to be reused: the benchmark (images and truth), the
    trunk's weights and precision, the search's settings, the training configuration the
    preset resolves to, and the run itself. JSON-normalised, as it is compared with the file."""
    train = (
        _train_config(config.preset, spec.strategy).to_dict()
        if spec.strategy != SEARCH_STRATEGY
        else None
    )
    settings = {
        "version": RUN_VERSION,
        "benchmark": benchmark.digest(),
        "weights": search.extractor.weights.identity,
        "precision": search.extractor.precision,
        "search": dataclasses.asdict(search.settings),
        "preset": config.preset,
        "train": train,
        "background": config.background,
        "spec": RunResult(spec, [], {}, {}).to_dict()["spec"],
    }
    normalised: dict[str, Any] = json.loads(json.dumps(settings))
    return normalised


def _load_finished(path: Path, settings: dict[str, Any], spec: RunSpec) -> RunResult | None:
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if d.get("settings") != settings:
            return None
        r = d["result"]
        return RunResult(
            spec,
            [ClassScore.from_dict(s) for s in r["scores"]],
            r["review"],
            {k: float(v) for k, v in r["seconds"].items()},
            list(r.get("notes", [])),
            reused=True,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_ablation(
    benchmark: Benchmark,
    config: AblationConfig,
    *,
    search: SimSearch,
    out_dir: Path,
    open_image: OpenImage,
    device: torch.device | str = "cpu",
    resume: bool = True,
    run_missing: bool = True,
    progress: ProgressFn | None = None,
) -> Iterator[RunResult]:
    """Run (or reuse) every run of the grid, yielding results as they finish. Sessions go
    to ``out_dir/sessions/<review key>``, results to ``out_dir/runs/<key>.json``. Without
    ``run_missing`` only the finished runs are yielded (a report of a stopped ablation)."""
    out_dir = Path(out_dir)
    radius_l0 = paper_match_radius_l0(benchmark.patch_size_l0)
    specs = run_specs(config)
    reviews: dict[str, tuple[Session, ReviewOutcome, float]] = {}
    for n, spec in enumerate(specs):
        if progress is not None:
            progress("ablation runs", n, len(specs))
        record = out_dir / "runs" / f"{spec.key}.json"
        settings = _settings(benchmark, config, search, spec)
        done = _load_finished(record, settings, spec) if resume else None
        if done is not None:
            yield done
            continue
        if not run_missing:
            continue
        t0 = time.perf_counter()
        if spec.review_key not in reviews:
            root = out_dir / "sessions" / spec.review_key
            if root.exists():
                shutil.rmtree(root)
            session = Session.create(root)
            outcome = simulate_review(
                search,
                session,
                images=benchmark.review,
                classes=benchmark.classes,
                config=UserConfig(spec.prototypes, spec.negatives, config.background),
                patch_size_l0=benchmark.patch_size_l0,
                radius_l0=radius_l0,
                rng=spec.user_rng(),
                open_image=open_image,
                progress=progress,
            )
            reviews = {spec.review_key: (session, outcome, time.perf_counter() - t0)}
        session, outcome, review_s = reviews[spec.review_key]
        seconds = {"review": review_s}
        notes: list[str] = []
        t1 = time.perf_counter()
        if spec.strategy == SEARCH_STRATEGY:
            scores = score_search(
                search,
                benchmark,
                prototypes=session.all_prototypes(),
                open_image=open_image,
                radius_l0=radius_l0,
                progress=progress,
            )
            seconds["score"] = time.perf_counter() - t1
        else:
            trained = train_session(
                session,
                search,
                config=_train_config(config.preset, spec.strategy),
                open_image=open_image,
                noisy_images=benchmark.unlabelled,
                device=device,
                seed=spec.train_seed,
                progress=progress,
            )
            notes += trained.notes
            t2 = time.perf_counter()
            seconds["train"] = t2 - t1
            model = PatchModel(trained.bundle, device=device)
            scores = score_model(
                model, benchmark, open_image=open_image, radius_l0=radius_l0, progress=progress
            )
            seconds["score"] = time.perf_counter() - t2
        result = RunResult(spec, scores, outcome.to_dict(), seconds, notes)
        write_json_atomic(record, {"settings": settings, "result": result.to_dict()})
        yield result
    if progress is not None:
        progress("ablation runs", len(specs), len(specs))
