"""The evaluation harness of the SimSearch paper (Gupta et al. 2022).

Ground truth in simple open forms (:mod:`simsearch_wsi.eval.truth`: CSV tables, QuPath GeoJSON,
label masks, synthetic slides) and the paper's detection score, PR-AUC per class with ranked
centre matching (:mod:`simsearch_wsi.eval.metrics`). The simulated user (prototypes picked
from ground truth) and the ablation runs will join this package.
"""

from __future__ import annotations

from simsearch_wsi.eval.metrics import (
    ClassPR,
    ScoredDetection,
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
from simsearch_wsi.eval.truth import (
    GroundTruth,
    read_truth,
    read_truth_csv,
    read_truth_geojson,
    read_truth_mask,
    truth_from_label_array,
    truth_from_synthetic,
)

__all__ = [
    "ClassPR",
    "GroundTruth",
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
    "read_truth",
    "read_truth_csv",
    "read_truth_geojson",
    "read_truth_mask",
    "truth_from_label_array",
    "truth_from_synthetic",
]
