"""The evaluation harness of the SimSearch paper (Gupta et al. 2022).

Ground truth in simple open forms (:mod:`~simsearch_wsi.eval.truth`: CSV tables, QuPath
GeoJSON, label masks, synthetic slides; :mod:`~simsearch_wsi.eval.derived`: a colour-rule
pseudo-truth for IHC), the paper's detection score, PR-AUC per class with ranked centre matching
(:mod:`~simsearch_wsi.eval.metrics`), thresholded F1 and segmentation IoU
(:mod:`~simsearch_wsi.eval.thresholded`), the simulated user (:mod:`~simsearch_wsi.eval.user`),
benchmarks by role (:mod:`~simsearch_wsi.eval.benchmark`), the ablation over strategies, P, N
and repeats (:mod:`~simsearch_wsi.eval.ablation`, which imports torch) and its report
(:mod:`~simsearch_wsi.eval.report`). Importing this package stays light: the modules that run
models are imported on their own.
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
