"""Ranked detection matching and precision-recall AUC per class, as in the SimSearch paper.

The paper (Gupta et al. 2022) scores detections with PR-AUC per class: "a detection is a true
positive if within 3 x stride of an unmatched ground-truth centre", the stride being the
sliding window's stride in level-0 pixels (0.1 x the patch width), so the match radius is
0.3 x the patch width (:func:`paper_match_radius_l0`).

Definitions used throughout
---------------------------
Ranking
    detections are sorted by score, highest first; ties keep their input order (a stable
    sort), as in the COCO evaluation. With tied scores the result can depend on that order.
Matching (:func:`match_ranked`)
    in rank order, each detection takes the nearest still-unmatched true centre of its class at
    Euclidean distance ``<= max_distance_l0`` (inclusive; equally near centres: the one listed
    first); it is a true positive if it takes one, a false positive otherwise. A higher-ranked
    detection can thus take the only centre within reach of a nearer, lower-ranked one.
    Distances are compared squared (``dx**2 + dy**2 <= max_distance_l0**2``), which is exact
    for integer and half-pixel coordinates, so a centre exactly on the radius matches and
    equally near centres tie exactly.
Precision-recall curve (:func:`precision_recall_curve`)
    one point per detection in rank order: after the ``k``-th detection (k = 1..n),
    ``precision_k = TP_k / k`` and ``recall_k = TP_k / n_true``, ``TP_k`` the true positives
    among the first ``k``.
Average precision, PR-AUC (:func:`average_precision`)
    the all-point interpolated area (PASCAL VOC 2010+, COCO without its 101-point sampling):
    ``AP = sum_k (recall_k - recall_{k-1}) * max_{j >= k} precision_j`` with ``recall_0 = 0``,
    i.e. ``(1 / n_true) * sum over true positives k of max_{j >= k} precision_j``. Recall never
    reached counts as precision 0. ``n_true == 0`` gives NaN (undefined: nothing to find);
    no detections with ``n_true > 0`` gives 0.0.

Coordinates are level-0 pixels (``_l0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.spatial import cKDTree

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.eval.truth import GroundTruth

__all__ = [
    "ClassPR",
    "ScoredDetection",
    "assign_ranked",
    "average_precision",
    "class_pr",
    "match_ranked",
    "mean_average_precision",
    "paper_match_radius_l0",
    "pool_class_pr",
    "pr_auc_scores",
    "precision_recall_curve",
    "rank_order",
]


class ScoredDetection(Protocol):
    """What the scores need of a detection: a class and a box
    (:class:`~simsearch_wsi.infer.dense.Detection` and
    :class:`~simsearch_wsi.search.similarity.Suggestion` have them). The default score,
    ``"probability"``, also needs ``probabilities`` (class -> probability), as detections have.
    """

    @property
    def class_name(self) -> str: ...

    @property
    def box(self) -> BoxL0: ...


#: a detection's score: ``"probability"`` (its probability of the class scored) or a function
ScoreFn = Callable[[Any], float]


def paper_match_radius_l0(
    patch_width_l0: float, *, stride_fraction: float = 0.1, multiple: float = 3.0
) -> float:
    """The paper's match radius in level-0 pixels: ``multiple x stride``, where the stride is
    ``stride_fraction x patch_width_l0`` (default 3 x 0.1 x patch width = 0.3 x patch width).
    """
    for name, v in (
        ("patch_width_l0", patch_width_l0),
        ("stride_fraction", stride_fraction),
        ("multiple", multiple),
    ):
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")
    return float(multiple) * float(stride_fraction) * float(patch_width_l0)


def _check_radius(max_distance_l0: float) -> float:
    r = float(max_distance_l0)
    if not (r > 0 and math.isfinite(r)):
        raise ConfigError(f"max_distance_l0 must be a finite number > 0, got {max_distance_l0!r}")
    return r


def _xy(a: ArrayLike, name: str) -> NDArray[np.float64]:
    arr = np.asarray(a, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ConfigError(f"{name} must be an (n, 2) array of x, y, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ConfigError(f"{name} has non-finite coordinates")
    return arr


def _scores(a: ArrayLike, n: int | None, name: str = "scores") -> NDArray[np.float64]:
    s = np.asarray(a, dtype=np.float64).reshape(-1)
    if n is not None and len(s) != n:
        raise ConfigError(f"{name} has {len(s)} values for {n} detections; give one per detection")
    if np.isnan(s).any():
        raise ConfigError(f"{name} contain NaN; every detection needs a score")
    return s


def rank_order(scores: ArrayLike) -> NDArray[np.intp]:
    """Indices that sort ``scores`` (n,) from highest to lowest; ties keep input order."""
    s = _scores(scores, None)
    return np.argsort(-s, kind="stable").astype(np.intp)


def assign_ranked(
    pred_xy_l0: ArrayLike,
    scores: ArrayLike,
    *,
    true_xy_l0: ArrayLike,
    max_distance_l0: float,
) -> NDArray[np.intp]:
    """For each detection, the index of the true centre it matched, or -1 (see the module
    docstring for the rule).

    Parameters
    ----------
    pred_xy_l0
        (n, 2) detection centres ``x, y``, level-0 pixels.
    scores
        (n,) detection scores, higher = more confident; no NaN.
    true_xy_l0
        (m, 2) true object centres ``x, y``, level-0 pixels.
    max_distance_l0
        match radius in level-0 pixels (inclusive), finite and > 0.

    Returns
    -------
    NDArray[np.intp]
        (n,) in input order: index into ``true_xy_l0``, or -1 for a false positive. Each true
        index appears at most once.
    """
    r = _check_radius(max_distance_l0)
    pred = _xy(pred_xy_l0, "pred_xy_l0")
    true = _xy(true_xy_l0, "true_xy_l0")
    s = _scores(scores, len(pred))
    matched = np.full(len(pred), -1, dtype=np.intp)
    if len(pred) == 0 or len(true) == 0:
        return matched
    r2 = r * r
    order = np.argsort(-s, kind="stable")
    # candidates from the tree with a little slack; the exact inclusive test is done below
    candidates = cKDTree(true).query_ball_point(pred[order], r=r * (1.0 + 1e-9) + 1e-9)
    used = np.zeros(len(true), dtype=bool)
    for i, cand in zip(order, candidates, strict=True):
        if not cand:
            continue
        c = np.asarray(cand, dtype=np.intp)
        c = c[~used[c]]
        if c.size == 0:
            continue
        dx, dy = true[c, 0] - pred[i, 0], true[c, 1] - pred[i, 1]
        d2 = dx * dx + dy * dy
        keep = d2 <= r2
        if not keep.any():
            continue
        c, d2 = c[keep], d2[keep]
        j = c[np.lexsort((c, d2))[0]]  # nearest; equally near: lowest index
        used[j] = True
        matched[i] = j
    return matched


def match_ranked(
    pred_xy_l0: ArrayLike,
    scores: ArrayLike,
    *,
    true_xy_l0: ArrayLike,
    max_distance_l0: float,
) -> NDArray[np.bool_]:
    """(n,) True where the detection, in input order, is a true positive under the ranked
    rule (see :func:`assign_ranked` for the arguments and the module docstring for the rule).
    """
    return (
        assign_ranked(pred_xy_l0, scores, true_xy_l0=true_xy_l0, max_distance_l0=max_distance_l0)
        >= 0
    )


def _tp_flags(tp: ArrayLike, n_true: int) -> tuple[NDArray[np.bool_], int]:
    flags = np.asarray(tp).reshape(-1)
    if flags.size and flags.dtype != np.bool_ and not np.isin(flags, (0, 1)).all():
        raise ConfigError("tp must hold booleans (or 0/1), one per detection in rank order")
    flags = flags.astype(bool)
    if isinstance(n_true, bool) or not float(n_true).is_integer() or n_true < 0:
        raise ConfigError(f"n_true must be an integer >= 0, got {n_true!r}")
    n_tp = int(flags.sum())
    if n_tp > n_true:
        raise ConfigError(
            f"{n_tp} true positives for {n_true} true objects; each object matches at most once"
        )
    return flags, int(n_true)


def precision_recall_curve(
    tp: ArrayLike, n_true: int, *, scores: ArrayLike | None = None
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Precision and recall after each detection in rank order.

    Parameters
    ----------
    tp
        (n,) bool, detections sorted by score (highest first): True for a true positive.
    n_true
        number of true objects (>= the number of true positives).
    scores
        optional (n,) scores in the same order (non-increasing), returned as the thresholds.

    Returns
    -------
    precision, recall, thresholds
        float64 (n,) each: ``precision[k] = TP / (k + 1)``, ``recall[k] = TP / n_true`` (NaN
        when ``n_true == 0``) with TP the true positives among the first ``k + 1``;
        ``thresholds[k]`` the score of detection ``k`` (all NaN without ``scores``). Keeping
        the detections scored ``>= thresholds[k]`` gives point ``k`` when scores do not tie.
    """
    flags, n = _tp_flags(tp, n_true)
    cum = np.cumsum(flags, dtype=np.float64)
    precision = cum / np.arange(1, len(flags) + 1, dtype=np.float64)
    recall = cum / n if n > 0 else np.full(len(flags), np.nan)
    if scores is None:
        thresholds = np.full(len(flags), np.nan)
    else:
        thresholds = _scores(scores, len(flags))
        if (np.diff(thresholds) > 0).any():
            raise ConfigError("scores must be in rank order (non-increasing), like tp")
    return precision, recall, thresholds


def average_precision(tp: ArrayLike, n_true: int) -> float:
    """PR-AUC: the all-point interpolated average precision of detections in rank order.

    ``AP = sum_k (recall_k - recall_{k-1}) * max_{j >= k} precision_j`` (``recall_0 = 0``):
    the area under the precision-recall curve whose precision at recall ``r`` is the best
    precision at any recall ``>= r``. Arguments as :func:`precision_recall_curve`.

    Returns
    -------
    float
        in [0, 1]; NaN when ``n_true == 0``; 0.0 when there are no detections (and
        ``n_true > 0``).
    """
    flags, n = _tp_flags(tp, n_true)
    if n == 0:
        return math.nan
    if len(flags) == 0:
        return 0.0
    precision, _, _ = precision_recall_curve(flags, n)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(envelope[flags].sum() / n)


@dataclass(frozen=True, eq=False)
class ClassPR:
    """Precision-recall of one class.

    Attributes
    ----------
    class_name
        The class scored.
    ap
        PR-AUC (:func:`average_precision`); NaN when ``n_true == 0``.
    precision, recall
        float64 (n_pred,) after each detection in rank order (recall NaN when ``n_true == 0``).
    scores
        float64 (n_pred,) the detections' scores in rank order (the curve's thresholds).
    n_true
        True objects of the class.
    n_pred
        Detections of the class.
    tp
        bool (n_pred,) in rank order: True for a true positive.
    """

    class_name: str
    ap: float
    precision: NDArray[np.float64]
    recall: NDArray[np.float64]
    scores: NDArray[np.float64]
    n_true: int
    n_pred: int
    tp: NDArray[np.bool_]

    @property
    def n_tp(self) -> int:
        """True positives over all detections."""
        return int(self.tp.sum())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no arrays); ``ap`` is None when undefined."""
        return {
            "class": self.class_name,
            "ap": None if math.isnan(self.ap) else round(self.ap, 4),
            "true_positives": self.n_tp,
            "n_predicted": self.n_pred,
            "n_true": self.n_true,
        }


def _class_pr_ranked(
    class_name: str, scores: NDArray[np.float64], tp: NDArray[np.bool_], n_true: int
) -> ClassPR:
    """A :class:`ClassPR` from scores and flags already in rank order."""
    precision, recall, _ = precision_recall_curve(tp, n_true)
    return ClassPR(
        class_name=class_name,
        ap=average_precision(tp, n_true),
        precision=precision,
        recall=recall,
        scores=scores,
        n_true=int(n_true),
        n_pred=len(scores),
        tp=tp,
    )


def _score_fn(score: str | ScoreFn, class_name: str) -> ScoreFn:
    if callable(score):
        return score
    if score != "probability":
        raise ConfigError(
            f"score must be 'probability' or a function of a detection, got {score!r}"
        )

    def probability(d: Any) -> float:
        try:
            return float(d.probabilities[class_name])
        except KeyError:
            raise ConfigError(
                f"a detection of class {class_name!r} has no probability for it (classes: "
                f"{', '.join(d.probabilities)}); score with the model that made it"
            ) from None

    return probability


def class_pr(
    detections: Sequence[ScoredDetection],
    truth: GroundTruth,
    *,
    class_name: str,
    max_distance_l0: float,
    score: str | ScoreFn = "probability",
) -> ClassPR:
    """Precision-recall and PR-AUC of one class of one image.

    The detections scored are those whose ``class_name`` is ``class_name`` (the detector's
    per-class output), placed at their box centres and ranked by ``score``: by default
    ``d.probabilities[class_name]``, or a function of the detection. They are matched to
    ``truth.centres(class_name)`` by :func:`match_ranked` (a class absent from the truth has
    no true objects: AP NaN). Pool several images with :func:`pool_class_pr`.
    """
    r = _check_radius(max_distance_l0)
    fn = _score_fn(score, class_name)
    mine = [d for d in detections if d.class_name == class_name]
    s = _scores([fn(d) for d in mine], len(mine), f"scores of {class_name!r} detections")
    xy = np.array([d.box.center_l0 for d in mine], dtype=np.float64).reshape(-1, 2)
    true = truth.centres(class_name)
    tp = match_ranked(xy, s, true_xy_l0=true, max_distance_l0=r)
    order = np.argsort(-s, kind="stable")
    return _class_pr_ranked(class_name, s[order], tp[order], len(true))


def pr_auc_scores(
    detections: Sequence[ScoredDetection],
    truth: GroundTruth,
    *,
    classes: Sequence[str] | None = None,
    max_distance_l0: float,
    score: str | ScoreFn = "probability",
) -> dict[str, ClassPR]:
    """:func:`class_pr` for each of ``classes`` (default ``truth.classes``), in that order."""
    names = truth.classes if classes is None else tuple(classes)
    return {
        name: class_pr(
            detections, truth, class_name=name, max_distance_l0=max_distance_l0, score=score
        )
        for name in names
    }


def pool_class_pr(parts: Sequence[ClassPR]) -> ClassPR:
    """One class's precision-recall over several images: the images' detections ranked
    together by score (ties: earlier part first, then each part's rank), true objects summed.
    Matching is per image, so pooling the per-image results is exact."""
    if not parts:
        raise ConfigError("nothing to pool; give the per-image results of one class")
    names = {p.class_name for p in parts}
    if len(names) != 1:
        raise ConfigError(f"cannot pool different classes {sorted(names)}; pool one class")
    scores = np.concatenate([p.scores for p in parts]).astype(np.float64)
    tp = np.concatenate([p.tp for p in parts]).astype(bool)
    order = np.argsort(-scores, kind="stable")
    return _class_pr_ranked(
        parts[0].class_name, scores[order], tp[order], sum(p.n_true for p in parts)
    )


def mean_average_precision(results: Mapping[str, ClassPR]) -> float:
    """Mean AP over the classes whose AP is defined (NaN when none is)."""
    aps = [r.ap for r in results.values() if not math.isnan(r.ap)]
    return float(np.mean(aps)) if aps else math.nan
