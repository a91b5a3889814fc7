"""How good are the similarity search's suggestions from a few prototypes, before any training?

This scores the first step of SimSearch for one feature option (trunk weights + feature
normalisation, i.e. one :class:`~simsearch_wsi.search.engine.SimSearch`):

* **object truth** (:func:`object_search_quality`): ``repeats`` times, P random true objects per
  class of the benchmark's review images become prototypes
  (:func:`~simsearch_wsi.eval.user.pick_prototypes`); every local maximum on the test images is
  a detection ranked by its similarity; PR-AUC per class with the paper's matching
  (:func:`~simsearch_wsi.eval.ablation.score_search`).
* **region truth** (:func:`region_search_quality`, e.g. the IHC colour rule): prototypes are
  squares lying inside a class's region; the score is the precision of the ``k`` most similar
  suggestions (a suggestion is right when at least half of its box lies in the class's
  region). Recall is undefined for regions, hence precision at k rather than PR-AUC.

Prototype draws depend only on ``seed`` and the repeat, so every option sees the same prototypes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.eval.ablation import OpenImage, score_search
from simsearch_wsi.eval.benchmark import Benchmark
from simsearch_wsi.eval.metrics import paper_match_radius_l0
from simsearch_wsi.eval.user import NO_THRESHOLD, TruthImage, pick_prototypes, square_box
from simsearch_wsi.features.extractor import ProgressFn
from simsearch_wsi.search.engine import SimSearch
from simsearch_wsi.search.similarity import Prototype

#: a region prototype must lie at least this much inside its class's region
REGION_PROTOTYPE_INSIDE = 0.9
#: a region suggestion counts as right when at least this fraction of its box is the class
REGION_HIT_FRACTION = 0.5


@dataclass
class SearchQuality:
    """Per-repeat scores: ``per_class[c][r]`` for class ``c``, repeat ``r``; ``mean`` over
    classes and repeats, ``repeat_means`` (R,) over classes per repeat."""

    metric: str
    classes: tuple[str, ...]
    per_class: dict[str, list[float]] = field(default_factory=dict)

    @property
    def repeat_means(self) -> list[float]:
        n = len(next(iter(self.per_class.values()), []))
        return [float(np.nanmean([self.per_class[c][r] for c in self.classes])) for r in range(n)]

    @property
    def mean(self) -> float:
        return float(np.nanmean(self.repeat_means)) if self.repeat_means else float("nan")

    @property
    def std(self) -> float:
        """Standard deviation of the repeat means (how much the prototype draw matters)."""
        return float(np.std(self.repeat_means)) if self.repeat_means else float("nan")

    def class_mean(self, name: str) -> float:
        return float(np.nanmean(self.per_class[name]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mean": self.mean,
            "std_over_repeats": self.std,
            "per_class_mean": {c: self.class_mean(c) for c in self.classes},
            "per_class": self.per_class,
        }


def _check(prototypes_per_class: int, repeats: int) -> None:
    if prototypes_per_class < 1 or repeats < 1:
        raise ConfigError(
            f"need at least 1 prototype per class and 1 repeat, got {prototypes_per_class}, "
            f"{repeats}"
        )


def object_search_quality(
    search: SimSearch,
    benchmark: Benchmark,
    *,
    open_image: OpenImage,
    prototypes_per_class: int = 5,
    repeats: int = 5,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> SearchQuality:
    """PR-AUC of the search alone on ``benchmark.test`` from P random review objects per class
    (module docstring)."""
    _check(prototypes_per_class, repeats)
    out = SearchQuality("PR-AUC", benchmark.classes, {c: [] for c in benchmark.classes})
    radius = paper_match_radius_l0(benchmark.patch_size_l0)
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        prototypes, _ = pick_prototypes(
            benchmark.review,
            benchmark.classes,
            per_class=prototypes_per_class,
            patch_size_l0=benchmark.patch_size_l0,
            rng=rng,
        )
        scores = score_search(
            search,
            benchmark,
            prototypes=prototypes,
            open_image=open_image,
            radius_l0=radius,
            progress=progress,
        )
        for s in scores:
            out.per_class[s.class_name].append(float(s.ap))
    return out


def region_prototypes(
    image: TruthImage,
    classes: Sequence[str],
    *,
    per_class: int,
    patch_size_l0: float,
    rng: np.random.Generator,
) -> list[Prototype]:
    """``per_class`` squares per class, centred on random pixels of the class's region whose
    square lies at least :data:`REGION_PROTOTYPE_INSIDE` inside it."""
    truth = image.truth
    if truth.mask is None:
        raise ConfigError(f"{image.path}: region prototypes need truth with a label mask")
    sx, sy = truth.mask_downsample
    out: list[Prototype] = []
    for name in classes:
        k = truth.mask_classes.index(name) + 1
        ys, xs = np.nonzero(truth.mask == k)
        order = rng.permutation(len(ys))
        chosen: list[Prototype] = []
        for idx in order[: 50 * per_class]:
            centre = ((xs[idx] + 0.5) * sx, (ys[idx] + 0.5) * sy)
            box = square_box(centre, patch_size_l0)
            if truth.mask_fraction(box, name) >= REGION_PROTOTYPE_INSIDE:
                chosen.append(Prototype(name, box, image=image.key))
                if len(chosen) == per_class:
                    break
        if len(chosen) < per_class:
            raise ConfigError(
                f"{image.path}: class {name!r} has too few places for {per_class} prototypes of "
                f"{patch_size_l0:.0f} px inside its region; use smaller patches"
            )
        out += chosen
    return out


def region_search_quality(
    search: SimSearch,
    image: TruthImage,
    *,
    classes: Sequence[str],
    open_image: OpenImage,
    patch_size_l0: float,
    top_k: int = 25,
    prototypes_per_class: int = 3,
    repeats: int = 5,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> SearchQuality:
    """Precision of the ``top_k`` most similar suggestions per class on ``image`` itself, from
    prototypes inside the class regions of its region truth (module docstring)."""
    _check(prototypes_per_class, repeats)
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    names = tuple(classes)
    out = SearchQuality(f"precision@{top_k}", names, {c: [] for c in names})
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        prototypes = region_prototypes(
            image, names, per_class=prototypes_per_class, patch_size_l0=patch_size_l0, rng=rng
        )
        with open_image(str(image.path)) as src:
            result = search.suggest(
                src,
                prototypes,
                thresholds=dict.fromkeys(names, NO_THRESHOLD),
                patch_size_l0=(patch_size_l0, patch_size_l0),
                progress=progress,
            )
        for c in names:
            ranked = sorted(
                (s for s in result.suggestions if s.class_name == c), key=lambda s: -s.similarity
            )[:top_k]
            hits = [image.truth.mask_fraction(s.box, c) >= REGION_HIT_FRACTION for s in ranked]
            out.per_class[c].append(float(np.mean(hits)) if hits else 0.0)
    return out
