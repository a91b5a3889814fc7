"""A simulated user that follows the SimSearch paper's protocol, playing the pathologist.

Given images with ground truth, for each class:

1. **Prototypes**: ``P`` true objects picked at random (without replacement, pooled over the
   review images); the user draws a square of the experiment's patch size around each.
2. **Suggestions**: the search runs with every prototype on every review image with no
   threshold (every local maximum is a suggestion). The user walks down the class's suggestions
   from the most similar, i.e. lowers the similarity threshold, until the ``N + 1``-th wrong one:
   the first ``N`` wrong ones are flagged as negatives, every correct one above the stop is
   approved, and the class's threshold is set at the last suggestion kept (with ``N = 0``,
   just above the first wrong suggestion). The search's suggestions are capped per class and
   image (``SearchSettings.max_per_class``, 500). A suggestion is correct when its centre is
   within ``radius_l0`` of a true object of its class that no earlier (more similar)
   suggestion took, the paper's matching rule; one that lands on a prototype's own object is
   skipped (a user would not label it).
   Classes known only as regions of a mask (tissue types, :meth:`GroundTruth.is_region_class`)
   are judged by area instead: a suggestion is correct when at least :data:`REGION_FRACTION` of
   its box is that class.
3. **Background**: the search's background candidates (most and least similar to the mean
   prototype, away from every suggestion) are confirmed when their box touches no true object
   and at most :data:`BACKGROUND_MAX_FRACTION` of it is labelled in the truth's mask, flagged
   ``not background`` otherwise.

Prototypes can also be given (the user's own rectangles, e.g. a QuPath GeoJSON file) instead of
picked; true objects within ``radius_l0`` of their centres are then the prototypes' own.

The decisions go into a :class:`~simsearch_wsi.review.session.Session` exactly as a real review
would, so training runs on it unchanged. Everything random comes from the ``rng`` passed in.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.eval.truth import GroundTruth
from simsearch_wsi.features.extractor import ProgressFn
from simsearch_wsi.io.base import ImageSource
from simsearch_wsi.review.session import Session
from simsearch_wsi.search.engine import SimSearch, SuggestResult
from simsearch_wsi.search.similarity import Prototype, Suggestion

__all__ = [
    "BACKGROUND_MAX_FRACTION",
    "NO_THRESHOLD",
    "REGION_FRACTION",
    "ReviewOutcome",
    "TruthImage",
    "UserConfig",
    "claimed_by_prototypes",
    "pick_prototypes",
    "review_background",
    "review_ranked",
    "simulate_review",
]

#: the similarity threshold that lets every local maximum through (cosine similarity >= -1)
NO_THRESHOLD = -1.0
#: a suggestion of a region class is correct when at least this fraction of its box is the class
REGION_FRACTION = 0.5
#: a background candidate is confirmed only when at most this fraction of its box is labelled
BACKGROUND_MAX_FRACTION = 0.1


@dataclass(frozen=True)
class TruthImage:
    """An image and its ground truth (``mpp`` overrides the file's pixel size when given)."""

    path: Path
    truth: GroundTruth
    mpp: float | None = None

    @property
    def key(self) -> str:
        """The image's resolved path, as sessions and prototypes record it."""
        return str(Path(self.path).resolve())


@dataclass(frozen=True)
class UserConfig:
    """What the simulated user does: ``prototypes_per_class`` (P), ``negatives_per_class``
    (N) and ``background`` candidates asked for per review image (as many most similar and as
    many least similar to the mean prototype)."""

    prototypes_per_class: int = 5
    negatives_per_class: int = 5
    background: int = 8

    def __post_init__(self) -> None:
        if self.prototypes_per_class < 1:
            raise ConfigError(f"prototypes per class must be >= 1, got {self.prototypes_per_class}")
        if self.negatives_per_class < 0 or self.background < 0:
            raise ConfigError(
                f"negatives per class and background candidates must be >= 0, got "
                f"{self.negatives_per_class}, {self.background}"
            )


@dataclass
class ReviewOutcome:
    """What the simulated user labelled, per class, and the thresholds it set."""

    prototypes: dict[str, int] = field(default_factory=dict)
    approved: dict[str, int] = field(default_factory=dict)
    flagged: dict[str, int] = field(default_factory=dict)
    suggested: dict[str, int] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    background: int = 0
    not_background: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "prototypes": self.prototypes,
            "approved": self.approved,
            "flagged": self.flagged,
            "suggested": self.suggested,
            "thresholds": {c: round(t, 4) for c, t in self.thresholds.items()},
            "background": self.background,
            "not_background": self.not_background,
        }


def square_box(center_l0: tuple[float, float], size_l0: float) -> BoxL0:
    """A ``size_l0``-sided square centred on ``center_l0`` (the rectangle a user draws)."""
    cx, cy = center_l0
    return BoxL0(cx - size_l0 / 2.0, cy - size_l0 / 2.0, size_l0, size_l0)


def pick_prototypes(
    images: Sequence[TruthImage],
    classes: Sequence[str],
    *,
    per_class: int,
    patch_size_l0: float,
    rng: np.random.Generator,
) -> tuple[list[Prototype], dict[str, set[tuple[int, int]]]]:
    """``per_class`` random true objects per class, pooled over ``images``, as prototypes (a
    ``patch_size_l0`` square on each object's centre, ``Prototype.image`` set). Also returns,
    per class, the ``(image index, object index)`` pairs taken."""
    prototypes: list[Prototype] = []
    taken: dict[str, set[tuple[int, int]]] = {}
    for name in classes:
        pool = [(i, k) for i, im in enumerate(images) for k in range(im.truth.n_objects(name))]
        if len(pool) < per_class:
            raise ConfigError(
                f"class {name!r} has {len(pool)} true objects in the review images, fewer than "
                f"the {per_class} prototypes asked for; lower P or add review images"
            )
        chosen = rng.choice(len(pool), size=per_class, replace=False)
        taken[name] = {pool[int(c)] for c in chosen}
        for c in sorted(int(c) for c in chosen):
            i, k = pool[c]
            centre = images[i].truth.centres(name)[k]
            prototypes.append(
                Prototype(
                    name,
                    square_box((float(centre[0]), float(centre[1])), patch_size_l0),
                    image=images[i].key,
                )
            )
    return prototypes, taken


def claimed_by_prototypes(
    prototypes: Sequence[Prototype],
    images: Sequence[TruthImage],
    *,
    classes: Sequence[str],
    radius_l0: float,
) -> dict[str, set[tuple[int, int]]]:
    """Per class, the ``(image index, object index)`` true objects within ``radius_l0`` of a
    given prototype's centre (the prototypes' own objects). Raises :class:`ConfigError` for a
    prototype of an unknown class or of none of ``images``."""
    index = {im.key: i for i, im in enumerate(images)}
    taken: dict[str, set[tuple[int, int]]] = {c: set() for c in classes}
    for p in prototypes:
        if p.class_name not in taken:
            raise ConfigError(
                f"prototype class {p.class_name!r} is not among the classes {list(classes)}; "
                "rename the prototype's classification or add the class"
            )
        i = index.get(str(Path(p.image).resolve())) if p.image else None
        if i is None:
            raise ConfigError(
                f"prototype {p.class_name!r} at {p.box} is on {p.image!r}, not on a review "
                "image; set its image to one of the review images"
            )
        centres = images[i].truth.centres(p.class_name)
        if len(centres):
            cx, cy = p.box.center_l0
            d2 = (centres[:, 0] - cx) ** 2 + (centres[:, 1] - cy) ** 2
            taken[p.class_name] |= {(i, int(k)) for k in np.flatnonzero(d2 <= radius_l0**2)}
    return taken


def review_ranked(
    ranked: Sequence[tuple[int, Suggestion]],
    images: Sequence[TruthImage],
    *,
    class_name: str,
    negatives: int,
    radius_l0: float,
    claimed: set[tuple[int, int]] = frozenset(),  # type: ignore[assignment]
) -> tuple[list[tuple[int, Suggestion]], list[tuple[int, Suggestion]], float | None]:
    """Walk down ``ranked`` ``(image index, suggestion)`` pairs of one class (most similar
    first) until ``negatives + 1`` wrong ones are seen (module docstring).

    Returns (approved, flagged, threshold): the correct suggestions above the stop, the first
    ``negatives`` wrong ones, and the similarity of the last suggestion kept (``None`` when
    nothing was kept). ``claimed`` objects (prototypes) are skipped when a suggestion lands on
    them. On an image where the class is a region of the mask, correctness is by area
    (:data:`REGION_FRACTION`).
    """
    used: set[tuple[int, int]] = set()
    approved: list[tuple[int, Suggestion]] = []
    flagged: list[tuple[int, Suggestion]] = []
    threshold: float | None = None
    r2 = radius_l0 * radius_l0
    for i, s in ranked:
        truth = images[i].truth
        if truth.is_region_class(class_name):
            if truth.mask_fraction(s.box, class_name) >= REGION_FRACTION:
                approved.append((i, s))
            elif len(flagged) == negatives:
                break
            else:
                flagged.append((i, s))
            threshold = s.similarity
            continue
        centres = images[i].truth.centres(class_name)
        cx, cy = s.box.center_l0
        d2 = (centres[:, 0] - cx) ** 2 + (centres[:, 1] - cy) ** 2 if len(centres) else None
        hit: tuple[int, int] | None = None
        on_prototype = False
        if d2 is not None:
            for k in np.argsort(d2, kind="stable"):
                if d2[k] > r2:
                    break
                if (i, int(k)) in claimed:
                    on_prototype = True
                    break
                if (i, int(k)) not in used:
                    hit = (i, int(k))
                    break
        if on_prototype:
            continue
        if hit is not None:
            used.add(hit)
            approved.append((i, s))
        else:
            if len(flagged) == negatives:
                break
            flagged.append((i, s))
        threshold = s.similarity
    return approved, flagged, threshold


def _touches_truth(box: BoxL0, truth: GroundTruth, radius_l0: float) -> bool:
    """True when ``box`` overlaps a true object's box, is within ``radius_l0`` of a true
    object known only as a point, or has more than :data:`BACKGROUND_MAX_FRACTION` of its
    area labelled in the mask."""
    if truth.mask_fraction(box) > BACKGROUND_MAX_FRACTION:
        return True
    cx, cy = box.center_l0
    for name in truth.class_names:
        for (x, y), (bx, by, bw, bh) in zip(truth.centres(name), truth.boxes(name), strict=True):
            if np.isfinite([bx, by, bw, bh]).all():
                if box.intersects(BoxL0(bx, by, bw, bh)):
                    return True
            elif box.contains_point(x, y) or (x - cx) ** 2 + (y - cy) ** 2 <= radius_l0**2:
                return True
    return False


def review_background(
    candidates: Sequence[Suggestion], truth: GroundTruth, *, radius_l0: float
) -> tuple[list[Suggestion], list[Suggestion]]:
    """(confirmed, flagged) background candidates: confirmed when touching no true object
    (nor a labelled region of the mask)."""
    confirmed = [c for c in candidates if not _touches_truth(c.box, truth, radius_l0)]
    flagged = [c for c in candidates if _touches_truth(c.box, truth, radius_l0)]
    return confirmed, flagged


def simulate_review(
    search: SimSearch,
    session: Session,
    *,
    images: Sequence[TruthImage],
    classes: Sequence[str],
    config: UserConfig,
    patch_size_l0: float,
    radius_l0: float,
    rng: np.random.Generator,
    open_image: Callable[[str | os.PathLike[str]], ImageSource],
    prototypes: Sequence[Prototype] | None = None,
    progress: ProgressFn | None = None,
) -> ReviewOutcome:
    """Play the user on ``images`` (module docstring) and record everything in ``session``
    (saved; the images are marked reviewed). ``prototypes`` (each with ``image`` set to one of
    the images' :attr:`TruthImage.key`) replace the random pick (``config``'s P is then
    unused). Returns what was labelled."""
    if not images:
        raise ConfigError("the simulated user needs at least one review image with ground truth")
    if prototypes is None:
        prototypes, taken = pick_prototypes(
            images,
            classes,
            per_class=config.prototypes_per_class,
            patch_size_l0=patch_size_l0,
            rng=rng,
        )
    else:
        taken = claimed_by_prototypes(prototypes, images, classes=classes, radius_l0=radius_l0)
        # every prototype names its image by the key the session uses
        prototypes = [
            dataclasses.replace(p, image=str(Path(p.image).resolve())) if p.image else p
            for p in prototypes
        ]
        missing = [c for c in classes if not any(p.class_name == c for p in prototypes)]
        if missing:
            raise ConfigError(
                f"no prototype given for class(es) {missing}; draw at least one rectangle of "
                "each class or leave the class out"
            )
    for im in images:
        session.add_prototypes(im.key, [p for p in prototypes if p.image == im.key])
    outcome = ReviewOutcome(
        prototypes={c: sum(p.class_name == c for p in prototypes) for c in classes}
    )
    per_class: dict[str, list[tuple[int, Suggestion]]] = {c: [] for c in classes}
    results: list[SuggestResult] = []
    for i, im in enumerate(images):
        with open_image(im.path) as image:
            result = search.suggest(
                image,
                prototypes,
                thresholds=dict.fromkeys(classes, NO_THRESHOLD),
                n_background=config.background,
                patch_size_l0=(patch_size_l0, patch_size_l0),
                progress=progress,
            )
        results.append(result)
        for s in result.suggestions:
            per_class[s.class_name].append((i, s))
    for name in classes:
        ranked = sorted(per_class[name], key=lambda t: -t[1].similarity)
        claimed = taken[name]
        approved, flagged, threshold = review_ranked(
            ranked,
            images,
            class_name=name,
            negatives=config.negatives_per_class,
            radius_l0=radius_l0,
            claimed=claimed,
        )
        for i, s in approved:
            session.add_decision(images[i].key, "positive", class_name=name, box=s.box)
        for i, s in flagged:
            session.add_decision(images[i].key, "negative", class_name=name, box=s.box)
        outcome.suggested[name] = len(ranked)
        outcome.approved[name] = len(approved)
        outcome.flagged[name] = len(flagged)
        if threshold is None:  # nothing kept: the threshold goes just above every suggestion
            top = ranked[0][1].similarity if ranked else 1.0
            threshold = float(np.nextafter(np.float32(top), np.float32(np.inf)))
        outcome.thresholds[name] = float(threshold)
    for im, result in zip(images, results, strict=True):
        confirmed, rejected = review_background(result.background, im.truth, radius_l0=radius_l0)
        for s in confirmed:
            session.add_decision(im.key, "background", class_name="background", box=s.box)
        for s in rejected:
            session.add_decision(im.key, "not_background", class_name="background", box=s.box)
        outcome.background += len(confirmed)
        outcome.not_background += len(rejected)
        if im.key not in session.reviewed_images:
            session.reviewed_images.append(im.key)
    session.set_thresholds(outcome.thresholds)
    session.save()
    return outcome
