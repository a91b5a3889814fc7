"""Two models' class probabilities as one: a product of experts (issue 27).

The search head on the fine-tuned trunk and the search head on the search's own trunk rank
different windows wrongly (docs/evaluation.md, "Training study", 2026-12-07): the mean of
their log-probabilities, renormalised over the classes, keeps what both agree on and was
above either alone on the study's cases.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

#: probabilities are raised to this before the logarithm, so a zero gives a very low but finite
#: log-probability (log(0) would give NaN after the renormalisation)
_FLOOR = 1e-300


def combine_experts(
    probabilities: list[NDArray[np.floating]], *, class_axis: int = 0
) -> NDArray[np.float32]:
    """The product of experts of several models' class probabilities of the same windows.

    Each array holds K class probabilities along ``class_axis`` (e.g. (K, Hp, Wp) maps with
    ``class_axis=0``, or (N, K) patches with ``class_axis=1``), all of one shape. Returns the
    softmax of the mean log-probability, float32 of that shape; NaN wherever any model has
    NaN (a window one of them did not score).
    """
    if not probabilities:
        raise ValueError("combine_experts needs at least one model's probabilities")
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
        logp = np.log(np.maximum(stack, _FLOOR)).mean(axis=0)
        logp -= np.logaddexp.reduce(logp, axis=class_axis, keepdims=True)
    out: NDArray[np.float32] = np.exp(logp).astype(np.float32)
    out[np.broadcast_to(np.expand_dims(invalid, class_axis), out.shape)] = np.nan
    return out
