"""Two models' class probabilities as one: a product of experts (issue 27).

The search head on the fine-tuned trunk and the search head on the search's own trunk rank
different windows wrongly (docs/evaluation.md, "Training study", 2026-12-07): the mean of
their log-probabilities, renormalised over the classes, keeps what both agree on and was
above either alone on the study's cases. The search's own similarity to the prototypes is a
third expert at a lower weight (:func:`similarity_expert_head`, ``TrainConfig.similarity_expert``;
"the search's similarity as a third expert" in the same section): it ranks the look-alikes the
heads confuse with a class lower.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray

#: probabilities are raised to this before the logarithm, so a zero gives a very low but finite
#: log-probability (log(0) would give NaN after the renormalisation)
_FLOOR = 1e-300


def combine_experts(
    probabilities: list[NDArray[np.floating]],
    *,
    class_axis: int = 0,
    weights: Sequence[float] | None = None,
) -> NDArray[np.float32]:
    """The product of experts of several models' class probabilities of the same windows.

    Each array holds K class probabilities along ``class_axis`` (e.g. (K, Hp, Wp) maps with
    ``class_axis=0``, or (N, K) patches with ``class_axis=1``), all of one shape. Returns the
    softmax of the mean log-probability (weighted by ``weights``, one per model, >= 0 and not
    all 0; default equal), float32 of that shape; NaN wherever any model has NaN (a window one
    of them did not score).
    """
    if not probabilities:
        raise ValueError("combine_experts needs at least one model's probabilities")
    w = np.ones(len(probabilities)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(probabilities),) or not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError(
            f"combine_experts needs one finite weight >= 0 per model, got {list(w)} for "
            f"{len(probabilities)} models"
        )
    if not w.sum() > 0:
        raise ValueError("combine_experts needs a weight above 0")
    shape = probabilities[0].shape
    if any(p.shape != shape for p in probabilities):
        raise ValueError(
            f"the models' probabilities differ in shape: {[p.shape for p in probabilities]}"
        )
    if not -len(shape) <= class_axis < len(shape):
        raise ValueError(f"class_axis {class_axis} is outside the arrays' {len(shape)} axes")
    class_axis %= len(shape)  # -1 names the last axis, as in numpy
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in probabilities])
    invalid = ~np.isfinite(stack).all(axis=(0, 1 + class_axis))
    with np.errstate(invalid="ignore"):
        logs = np.log(np.maximum(stack, _FLOOR))
        # equal weights: the plain mean (bit for bit what two-model bundles always gave)
        logp = logs.mean(axis=0) if weights is None else np.tensordot(w / w.sum(), logs, axes=1)
        logp -= np.logaddexp.reduce(logp, axis=class_axis, keepdims=True)
    out: NDArray[np.float32] = np.exp(logp).astype(np.float32)
    out[np.broadcast_to(np.expand_dims(invalid, class_axis), out.shape)] = np.nan
    return out


#: the similarity expert (:func:`similarity_expert_head`): its temperature, in cosine
#: similarity (a window's class logit is ``s_c / T``) ...
SIMILARITY_EXPERT_TEMPERATURE = 0.1
#: ... and the background's logit ``SIMILARITY_EXPERT_CEILING / T``: at the ceiling of the
#: cosine similarity, so that a class's log-odds against the background grow with its
#: similarity alone (the search's ranking) rather than with its margin over the other classes
SIMILARITY_EXPERT_CEILING = 1.0


def similarity_expert_head(
    n_classes: int, background: int, *, temperature: float, ceiling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, 2) similarity weights and (K,) biases of the similarity expert, in the search head's
    form (:class:`simsearch_wsi.search.probe.MemoryHead`: logit ``a_c s_c - g_c n_c + b_c``,
    background's 0): ``a_c = 1 / T``, ``g_c = 0``, ``b_c = -ceiling / T``, so that its class
    probabilities are the softmax of ``s_c / T`` beside a background logit ``ceiling / T``."""
    if not temperature > 0:
        raise ValueError(f"the similarity expert's temperature must be > 0, got {temperature}")
    weight = torch.zeros(n_classes, 2)
    bias = torch.zeros(n_classes)
    fg = torch.arange(n_classes) != background
    weight[fg, 0] = 1.0 / temperature
    bias[fg] = -ceiling / temperature
    return weight, bias
