"""Ranked matching and PR-AUC (simsearch_wsi.eval.metrics): hand-computed cases and brute force."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.eval import (
    GroundTruth,
    assign_ranked,
    average_precision,
    class_pr,
    match_ranked,
    mean_average_precision,
    paper_match_radius_l0,
    pool_class_pr,
    pr_auc_scores,
    precision_recall_curve,
    rank_order,
)


@dataclass(frozen=True)
class Det:
    """Stand-in for simsearch_wsi.infer.dense.Detection (same fields; importing infer pulls in
    torch)."""

    class_name: str
    box: BoxL0
    probability: float
    probabilities: dict[str, float] = field(default_factory=dict)


def det(name: str, cx: float, cy: float, p: float, **others: float) -> Det:
    """A 10 x 10 detection centred at (cx, cy) with probability p of its class."""
    return Det(name, BoxL0(cx - 5, cy - 5, 10, 10), p, {name: p, **others})


# --- precision, recall, AP by hand ------------------------------------------------------------
def test_curve_and_ap_hand_computed() -> None:
    # scores 0.9, 0.8, 0.7, 0.6 ranked; TP pattern 1, 0, 1, 0; 3 true objects
    # cumulative TP 1, 1, 2, 2 -> precision 1/1, 1/2, 2/3, 2/4; recall 1/3, 1/3, 2/3, 2/3
    tp = np.array([True, False, True, False])
    p, r, t = precision_recall_curve(tp, 3, scores=[0.9, 0.8, 0.7, 0.6])
    np.testing.assert_allclose(p, [1.0, 0.5, 2 / 3, 0.5])
    np.testing.assert_allclose(r, [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_array_equal(t, [0.9, 0.8, 0.7, 0.6])
    # interpolated precision at the recall steps: max(P[0:]) = 1 and max(P[2:]) = 2/3
    # AP = (1/3 - 0) * 1 + (2/3 - 1/3) * 2/3 + (recall 1 never reached: 0) = 1/3 + 2/9 = 5/9
    assert average_precision(tp, 3) == pytest.approx(5 / 9)
    assert average_precision([1, 0, 1, 0], 3) == pytest.approx(0.5556, abs=1e-4)


def test_ap_interpolation_lifts_earlier_precision() -> None:
    # TP pattern 0, 1, 1, 0, 1; 4 true objects
    # precision 0/1, 1/2, 2/3, 2/4, 3/5
    # envelope at the TPs: rank 2: max(1/2, 2/3, 1/2, 3/5) = 2/3; rank 3: 2/3; rank 5: 3/5
    # AP = (2/3 + 2/3 + 3/5) / 4 = (10 + 10 + 9) / 15 / 4 = 29/60
    assert average_precision([0, 1, 1, 0, 1], 4) == pytest.approx(29 / 60)


def test_perfect_ranking_and_partial_recall() -> None:
    # all TPs ranked first: precision 1 at every recall step -> AP 1
    assert average_precision([1, 1, 0, 0], 2) == 1.0
    assert average_precision([1, 1, 1], 3) == 1.0
    # half the objects found, both at precision 1: AP = 2/4 * 1 = 0.5
    assert average_precision([1, 1], 4) == 0.5
    # only false positives: AP 0
    assert average_precision([0, 0, 0], 2) == 0.0


def test_no_detections_and_no_truth() -> None:
    # no detections but objects to find -> 0.0
    p, r, t = precision_recall_curve(np.zeros(0, dtype=bool), 3)
    assert p.shape == r.shape == t.shape == (0,)
    assert average_precision([], 3) == 0.0
    # nothing to find -> NaN (undefined), recall NaN, precision still TP/k = 0
    assert math.isnan(average_precision([0, 0], 0))
    assert math.isnan(average_precision([], 0))
    p, r, t = precision_recall_curve([False, False], 0)
    np.testing.assert_array_equal(p, [0.0, 0.0])
    assert np.isnan(r).all() and np.isnan(t).all()


def test_curve_errors() -> None:
    with pytest.raises(ConfigError, match="true positives for 1 true"):
        average_precision([1, 1], 1)
    with pytest.raises(ConfigError, match="n_true"):
        average_precision([1], -1)
    with pytest.raises(ConfigError, match="booleans"):
        average_precision([0.5], 1)
    with pytest.raises(ConfigError, match="rank order"):
        precision_recall_curve([1, 0], 2, scores=[0.1, 0.9])
    with pytest.raises(ConfigError, match="one per detection"):
        precision_recall_curve([1, 0], 2, scores=[0.9])


# --- ranked matching by hand ------------------------------------------------------------------
def test_higher_score_steals_the_only_truth() -> None:
    truth = [[0.0, 0.0]]
    # A at distance 8 (score 0.9), B at distance 1 (score 0.5); radius 10: A goes first
    # and takes the only centre, B finds it taken -> A TP, B FP despite being nearer
    pred = [[8.0, 0.0], [1.0, 0.0]]
    np.testing.assert_array_equal(
        match_ranked(pred, [0.9, 0.5], true_xy_l0=truth, max_distance_l0=10), [True, False]
    )
    # swap the scores: B first -> B TP, A FP
    np.testing.assert_array_equal(
        match_ranked(pred, [0.5, 0.9], true_xy_l0=truth, max_distance_l0=10), [False, True]
    )


def test_nearest_unmatched_truth_is_taken() -> None:
    truth = [[0.0, 0.0], [5.0, 0.0]]
    # first detection (4, 0): distances 4 and 1 -> takes truth 1; second (1, 0): truth 1 is
    # taken, truth 0 at distance 1 -> takes truth 0
    got = assign_ranked([[4.0, 0.0], [1.0, 0.0]], [0.9, 0.8], true_xy_l0=truth, max_distance_l0=6)
    np.testing.assert_array_equal(got, [1, 0])
    # third detection near both: both taken -> FP
    got = assign_ranked(
        [[4.0, 0.0], [1.0, 0.0], [2.0, 0.0]], [0.9, 0.8, 0.7], true_xy_l0=truth, max_distance_l0=6
    )
    np.testing.assert_array_equal(got, [1, 0, -1])


def test_ties_keep_input_order() -> None:
    assert rank_order([0.5, 0.9, 0.5, 0.9]).tolist() == [1, 3, 0, 2]
    truth = [[0.0, 0.0]]
    # equal scores: the detection listed first is ranked first and takes the centre
    pred = [[6.0, 0.0], [1.0, 0.0]]
    np.testing.assert_array_equal(
        match_ranked(pred, [0.5, 0.5], true_xy_l0=truth, max_distance_l0=10), [True, False]
    )
    np.testing.assert_array_equal(
        match_ranked(pred[::-1], [0.5, 0.5], true_xy_l0=truth, max_distance_l0=10), [True, False]
    )
    # equally near centres: the one listed first is taken
    got = assign_ranked(
        [[0.0, 0.0]], [1.0], true_xy_l0=[[3.0, 0.0], [-3.0, 0.0]], max_distance_l0=5
    )
    np.testing.assert_array_equal(got, [0])
    # (1, 7) and (5, 5) are both sqrt(50) away from the origin: still a tie, first taken
    got = assign_ranked([[0.0, 0.0]], [1.0], true_xy_l0=[[5.0, 5.0], [1.0, 7.0]], max_distance_l0=8)
    np.testing.assert_array_equal(got, [0])


def test_radius_is_inclusive() -> None:
    # (3, 4) is exactly 5 from the origin
    assert match_ranked(
        [[3.0, 4.0]], [1.0], true_xy_l0=[[0.0, 0.0]], max_distance_l0=5.0
    ).tolist() == [True]
    assert match_ranked(
        [[3.0, 4.0]], [1.0], true_xy_l0=[[0.0, 0.0]], max_distance_l0=4.999
    ).tolist() == [False]
    # half-pixel coordinates: (0.5, 1.5) -> (2, 3.5) is (1.5, 2) = 2.5 away
    assert match_ranked(
        [[0.5, 1.5]], [1.0], true_xy_l0=[[2.0, 3.5]], max_distance_l0=2.5
    ).tolist() == [True]


def test_matching_empty_inputs_and_errors() -> None:
    none = match_ranked(np.zeros((0, 2)), [], true_xy_l0=[[0.0, 0.0]], max_distance_l0=1)
    assert none.shape == (0,)
    assert match_ranked(
        [[0.0, 0.0]], [1.0], true_xy_l0=np.zeros((0, 2)), max_distance_l0=1
    ).tolist() == [False]
    with pytest.raises(ConfigError, match="max_distance_l0"):
        match_ranked([[0.0, 0.0]], [1.0], true_xy_l0=[[0.0, 0.0]], max_distance_l0=0)
    with pytest.raises(ConfigError, match="max_distance_l0"):
        match_ranked([[0.0, 0.0]], [1.0], true_xy_l0=[[0.0, 0.0]], max_distance_l0=math.inf)
    with pytest.raises(ConfigError, match="2 values for 1"):
        match_ranked([[0.0, 0.0]], [1.0, 2.0], true_xy_l0=[[0.0, 0.0]], max_distance_l0=1)
    with pytest.raises(ConfigError, match="NaN"):
        match_ranked([[0.0, 0.0]], [math.nan], true_xy_l0=[[0.0, 0.0]], max_distance_l0=1)
    with pytest.raises(ConfigError, match=r"\(n, 2\)"):
        match_ranked([[0.0, 0.0, 0.0]], [1.0], true_xy_l0=[[0.0, 0.0]], max_distance_l0=1)


# --- brute force on random data ---------------------------------------------------------------
def brute_force_ap(tp: list[bool], n_true: int) -> float:
    """AP straight from the definition: the integral over recall of the interpolated precision
    p(r) = max{precision_k : recall_k >= r}, a step function between the distinct recalls."""
    precision, recall = [], []
    hits = 0
    for k, t in enumerate(tp, start=1):
        hits += int(t)
        precision.append(hits / k)
        recall.append(hits / n_true)
    area, previous = 0.0, 0.0
    for r in sorted(set(recall)):
        best = max(p for p, rr in zip(precision, recall, strict=True) if rr >= r)
        area += (r - previous) * best
        previous = r
    return area


def brute_force_match(
    pred: np.ndarray, scores: np.ndarray, true: np.ndarray, radius: float
) -> list[bool]:
    """Greedy ranked matching with plain loops (Python's sort is stable)."""
    order = sorted(range(len(pred)), key=lambda i: -scores[i])
    used = [False] * len(true)
    out = [False] * len(pred)
    for i in order:
        best, best_d2 = -1, math.inf
        for j in range(len(true)):
            d2 = (pred[i][0] - true[j][0]) ** 2 + (pred[i][1] - true[j][1]) ** 2
            if not used[j] and d2 <= radius**2 and d2 < best_d2:
                best, best_d2 = j, d2
        if best >= 0:
            used[best] = True
            out[i] = True
    return out


@pytest.mark.parametrize("seed", range(25))
def test_average_precision_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 40))
    tp = rng.random(n) < rng.uniform(0.1, 0.9)
    n_true = int(tp.sum()) + int(rng.integers(0, 6))
    if n_true == 0:
        assert math.isnan(average_precision(tp, n_true))
    elif n == 0:
        assert average_precision(tp, n_true) == 0.0
    else:
        assert average_precision(tp, n_true) == pytest.approx(brute_force_ap(tp.tolist(), n_true))


@pytest.mark.parametrize("seed", range(25))
def test_match_ranked_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # integer coordinates on a small field and scores in steps of 0.1: many exact ties of
    # distance and of score, and many detections competing for one centre
    pred = rng.integers(0, 40, size=(int(rng.integers(0, 60)), 2)).astype(float)
    true = rng.integers(0, 40, size=(int(rng.integers(0, 30)), 2)).astype(float)
    scores = np.round(rng.random(len(pred)), 1)
    radius = float(rng.integers(1, 8))
    got = match_ranked(pred, scores, true_xy_l0=true, max_distance_l0=radius)
    assert got.tolist() == brute_force_match(pred, scores, true, radius)
    # each centre matched at most once
    idx = assign_ranked(pred, scores, true_xy_l0=true, max_distance_l0=radius)
    assert len(set(idx[idx >= 0].tolist())) == int((idx >= 0).sum())


# --- per class, on detections -----------------------------------------------------------------
def test_class_pr_scores_detections_of_the_class() -> None:
    truth = GroundTruth.from_centres(
        {"ring": [[100.0, 100.0], [300.0, 100.0], [500.0, 500.0]], "cluster": [[50.0, 50.0]]}
    )
    dets = [
        det("ring", 102, 100, 0.9, cluster=0.05),  # TP (2 px from truth 0)
        det("ring", 700, 700, 0.8, cluster=0.1),  # FP (nothing near)
        det("ring", 300, 104, 0.7, cluster=0.2),  # TP (4 px from truth 1)
        det("ring", 101, 101, 0.6, cluster=0.3),  # FP (truth 0 already taken)
        det("cluster", 300, 100, 0.95, ring=0.01),  # other class: not a ring candidate
    ]
    res = class_pr(dets, truth, class_name="ring", max_distance_l0=10)
    # ranked TP pattern 1, 0, 1, 0 with 3 true rings: the first hand-computed case, AP 5/9
    assert res.tp.tolist() == [True, False, True, False]
    np.testing.assert_array_equal(res.scores, [0.9, 0.8, 0.7, 0.6])
    np.testing.assert_allclose(res.precision, [1.0, 0.5, 2 / 3, 0.5])
    np.testing.assert_allclose(res.recall, [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert res.ap == pytest.approx(5 / 9)
    assert (res.n_true, res.n_pred, res.n_tp) == (3, 4, 2)
    assert res.to_dict() == {
        "class": "ring",
        "ap": 0.5556,
        "true_positives": 2,
        "n_predicted": 4,
        "n_true": 3,
    }
    # the order of the input list does not matter when scores do not tie
    again = class_pr(dets[::-1], truth, class_name="ring", max_distance_l0=10)
    assert again.ap == res.ap and again.tp.tolist() == res.tp.tolist()

    # a score function ranks differently: by x, the FP at (700, 700) first, then (300, 104)
    # TP, (102, 100) TP, (101, 101) FP (taken) -> TP pattern 0, 1, 1, 0
    # precision 0, 1/2, 2/3, 2/4; envelope at the TPs 2/3, 2/3; AP = (2/3 + 2/3) / 3 = 4/9
    by_x = class_pr(dets, truth, class_name="ring", max_distance_l0=10, score=lambda d: d.box.x_l0)
    assert by_x.tp.tolist() == [False, True, True, False]
    np.testing.assert_array_equal(by_x.scores, [695.0, 295.0, 97.0, 96.0])
    assert by_x.ap == pytest.approx(4 / 9)


def test_pr_auc_scores_over_classes() -> None:
    truth = GroundTruth.from_centres({"ring": [[0.0, 0.0]], "cluster": [[100.0, 0.0]]})
    dets = [det("ring", 1, 0, 0.9), det("stripes", 500, 0, 0.7)]
    res = pr_auc_scores(dets, truth, classes=["ring", "cluster", "stripes"], max_distance_l0=5)
    assert list(res) == ["ring", "cluster", "stripes"]
    assert res["ring"].ap == 1.0
    assert res["cluster"].ap == 0.0 and res["cluster"].n_pred == 0  # no detections
    assert math.isnan(res["stripes"].ap) and res["stripes"].n_true == 0  # nothing to find
    assert res["stripes"].to_dict()["ap"] is None
    # mean over the defined APs: (1 + 0) / 2
    assert mean_average_precision(res) == 0.5
    assert math.isnan(mean_average_precision({"stripes": res["stripes"]}))
    # default classes: those of the truth
    assert list(pr_auc_scores(dets, truth, max_distance_l0=5)) == ["ring", "cluster"]


def test_class_pr_errors() -> None:
    truth = GroundTruth.from_centres({"ring": [[0.0, 0.0]]})
    no_prob = Det("ring", BoxL0(0, 0, 2, 2), 0.9, {"cluster": 0.1})
    with pytest.raises(ConfigError, match="no probability"):
        class_pr([no_prob], truth, class_name="ring", max_distance_l0=5)
    with pytest.raises(ConfigError, match="score must be"):
        class_pr([], truth, class_name="ring", max_distance_l0=5, score="logit")
    with pytest.raises(ConfigError, match="max_distance_l0"):
        class_pr([], truth, class_name="ring", max_distance_l0=-1)


def test_pool_class_pr_ranks_images_together() -> None:
    # image 1: ranked scores 0.9 (TP), 0.5 (FP), 1 true object
    # image 2: ranked scores 0.7 (TP), 0.6 (TP), 3 true objects
    # pooled ranking 0.9 T, 0.7 T, 0.6 T, 0.5 F with 4 true objects:
    # precision 1, 1, 1, 3/4 -> AP = (1 + 1 + 1) / 4 = 0.75
    t1 = GroundTruth.from_centres({"ring": [[0.0, 0.0]]})
    t2 = GroundTruth.from_centres({"ring": [[0.0, 0.0], [100.0, 0.0], [200.0, 0.0]]})
    r1 = class_pr(
        [det("ring", 0, 0, 0.9), det("ring", 50, 50, 0.5)],
        t1,
        class_name="ring",
        max_distance_l0=5,
    )
    r2 = class_pr(
        [det("ring", 0, 1, 0.7), det("ring", 100, 1, 0.6)],
        t2,
        class_name="ring",
        max_distance_l0=5,
    )
    pooled = pool_class_pr([r1, r2])
    np.testing.assert_array_equal(pooled.scores, [0.9, 0.7, 0.6, 0.5])
    assert pooled.tp.tolist() == [True, True, True, False]
    assert (pooled.n_true, pooled.n_pred) == (4, 4)
    assert pooled.ap == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="nothing to pool"):
        pool_class_pr([])
    other = class_pr([], t1, class_name="cluster", max_distance_l0=5)
    with pytest.raises(ConfigError, match="different classes"):
        pool_class_pr([r1, other])


def test_paper_match_radius() -> None:
    # stride = 0.1 x 48 px = 4.8 px; radius = 3 x 4.8 = 14.4 px
    assert paper_match_radius_l0(48) == pytest.approx(14.4)
    assert paper_match_radius_l0(100, stride_fraction=0.25, multiple=2) == pytest.approx(50.0)
    with pytest.raises(ConfigError, match="patch_width_l0"):
        paper_match_radius_l0(0)
    with pytest.raises(ConfigError, match="stride_fraction"):
        paper_match_radius_l0(48, stride_fraction=math.nan)
