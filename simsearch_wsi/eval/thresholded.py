"""Scores at one confidence threshold: detection F1 and segmentation IoU.

Detections are matched to true objects one-to-one by centre distance (the assignment that
minimises the total distance, pairs farther than ``max_distance_l0`` do not count); segmentation
is compared pixel by pixel with the true objects rasterised on the segmentation grid, or with a
ground-truth label mask on its own grid (:func:`segmentation_iou_on_truth`). The paper's
threshold-free score, PR-AUC, is in :mod:`simsearch_wsi.eval.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.eval.truth import GroundTruth, pixel_span_of_box
from simsearch_wsi.infer.dense import Detection
from simsearch_wsi.synthetic import SyntheticObject

__all__ = [
    "DetectionScore",
    "detection_scores",
    "rasterize_objects",
    "segmentation_iou",
    "segmentation_iou_on_truth",
]


@dataclass(frozen=True)
class DetectionScore:
    """Detection quality of one class: matched pairs, counts, precision, recall and F1."""

    class_name: str
    true_positives: int
    n_predicted: int
    n_true: int

    @property
    def precision(self) -> float:
        return self.true_positives / self.n_predicted if self.n_predicted else 1.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.n_true if self.n_true else 1.0

    @property
    def f1(self) -> float:
        total = self.n_predicted + self.n_true
        return 2.0 * self.true_positives / total if total else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "class": self.class_name,
            "true_positives": self.true_positives,
            "n_predicted": self.n_predicted,
            "n_true": self.n_true,
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "f1": round(self.f1, 4),
        }


def _matched(pred: NDArray[np.float64], true: NDArray[np.float64], max_distance: float) -> int:
    if len(pred) == 0 or len(true) == 0:
        return 0
    dist = np.linalg.norm(pred[:, None, :] - true[None, :, :], axis=2)
    # pairs beyond the radius get a cost that no within-radius assignment can beat
    cost = np.where(dist <= max_distance, dist, max_distance * (len(pred) + len(true) + 1))
    rows, cols = linear_sum_assignment(cost)
    return int((dist[rows, cols] <= max_distance).sum())


def detection_scores(
    detections: Sequence[Detection],
    objects: Sequence[SyntheticObject],
    *,
    classes: Sequence[str],
    max_distance_l0: float,
) -> dict[str, DetectionScore]:
    """Per-class precision, recall and F1 of ``detections`` against the true ``objects``.

    A detection and an object of the same class match when their centres are at most
    ``max_distance_l0`` level-0 pixels apart; each is matched at most once (optimal
    assignment).
    """
    if not (max_distance_l0 > 0 and math.isfinite(max_distance_l0)):
        raise ConfigError(f"max_distance_l0 must be a finite number > 0, got {max_distance_l0}")
    out: dict[str, DetectionScore] = {}
    for name in classes:
        pred = np.array(
            [d.box.center_l0 for d in detections if d.class_name == name], dtype=np.float64
        ).reshape(-1, 2)
        true = np.array(
            [o.center_l0 for o in objects if o.class_name == name], dtype=np.float64
        ).reshape(-1, 2)
        tp = _matched(pred, true, max_distance_l0)
        out[name] = DetectionScore(name, tp, len(pred), len(true))
    return out


def rasterize_objects(
    objects: Sequence[SyntheticObject],
    *,
    classes: Sequence[str],
    shape: tuple[int, int],
    downsample: tuple[float, float],
) -> NDArray[np.uint8]:
    """A label mask (H, W) of the objects' boxes on a grid of ``downsample`` (x, y) level-0
    pixels per mask pixel: 0 = none, ``k`` = ``classes[k - 1]``; a mask pixel belongs to a box
    when its centre does. Objects of other classes are left out."""
    labels = np.zeros(shape, dtype=np.uint8)
    for o in objects:
        if o.class_name not in classes:
            continue
        k = list(classes).index(o.class_name) + 1
        box = BoxL0(o.x_l0, o.y_l0, o.width_l0, o.height_l0)
        (i0, i1), (j0, j1) = pixel_span_of_box(box, downsample, shape=shape)
        labels[i0:i1, j0:j1] = k
    return labels


def segmentation_iou(
    labels: NDArray[np.integer[Any]],
    truth: NDArray[np.integer[Any]],
    *,
    classes: Sequence[str],
) -> dict[str, float]:
    """Intersection over union per class of two label masks of the same shape (value ``k`` =
    ``classes[k - 1]``); 1.0 for a class absent from both."""
    if labels.shape != truth.shape:
        raise ConfigError(f"label masks differ in shape: {labels.shape} vs {truth.shape}")
    out: dict[str, float] = {}
    for k, name in enumerate(classes, start=1):
        a, b = labels == k, truth == k
        union = int(np.count_nonzero(a | b))
        out[name] = int(np.count_nonzero(a & b)) / union if union else 1.0
    return out


def segmentation_iou_on_truth(
    labels: NDArray[np.integer[Any]],
    *,
    classes: Sequence[str],
    downsample: tuple[float, float],
    truth: GroundTruth,
) -> dict[str, float]:
    """IoU per class of a predicted label mask against the truth's label mask, on the truth's
    grid: each truth pixel takes the predicted label of the prediction pixel its centre falls
    in (nearest neighbour; outside the prediction = 0). ``labels`` (H, W): value ``k`` =
    ``classes[k - 1]`` on a grid of ``downsample`` (x, y) level-0 pixels per pixel. Scored
    classes are those of the truth's mask that the prediction also has; NaN for a class the
    prediction does not know, and for a class neither has here (nothing to score: averaging
    over images must not count it as a perfect 1.0)."""
    if truth.mask is None:
        raise ConfigError(
            f"{truth.source or 'ground truth'}: no label mask to score segmentation against; "
            "give the truth as a label image (or boxes, see GroundTruth.with_box_mask)"
        )
    t_ds_x, t_ds_y = truth.mask_downsample
    p_ds_x, p_ds_y = downsample
    th, tw = truth.mask.shape
    cols = np.floor((np.arange(tw) + 0.5) * t_ds_x / p_ds_x).astype(np.int64)
    rows = np.floor((np.arange(th) + 0.5) * t_ds_y / p_ds_y).astype(np.int64)
    inside_c = cols < labels.shape[1]
    inside_r = rows < labels.shape[0]
    resampled = np.zeros((th, tw), dtype=np.int64)
    block = labels[np.ix_(rows[inside_r], cols[inside_c])]
    resampled[np.ix_(inside_r, inside_c)] = block
    # renumber the prediction into the truth's class order
    lut = np.zeros(len(classes) + 1, dtype=np.int64)
    for k, name in enumerate(classes, start=1):
        if name in truth.mask_classes:
            lut[k] = truth.mask_classes.index(name) + 1
    # labels outside 1..len(classes) are no class (not the last one)
    resampled[(resampled < 0) | (resampled > len(classes))] = 0
    pred = lut[resampled]
    scores = segmentation_iou(pred, truth.mask, classes=truth.mask_classes)
    out: dict[str, float] = {}
    for k, n in enumerate(truth.mask_classes, start=1):
        absent = not (np.any(pred == k) or np.any(truth.mask == k))
        out[n] = math.nan if n not in classes or absent else scores[n]
    return out
