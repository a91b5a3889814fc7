"""``train.ensemble.combine_experts``: the product of experts of ``--head-input ensemble``."""

from __future__ import annotations

import numpy as np
import pytest

from simsearch_wsi.train.ensemble import combine_experts


def test_the_product_of_experts_on_either_class_axis() -> None:
    """The mean log-probability renormalised over the classes: the same on (N, K) with
    ``class_axis`` 1 or -1 and on the transposed (K, N) maps with 0; NaN wherever one model did
    not score a window; an axis outside the arrays is a one-line error."""
    rng = np.random.default_rng(0)
    a = rng.dirichlet(np.ones(3), size=5).astype(np.float32)  # (N, K)
    b = rng.dirichlet(np.ones(3), size=5).astype(np.float32)
    a[2] = np.nan
    expected = np.sqrt(a * b)
    expected /= expected.sum(axis=1, keepdims=True)
    by_rows = combine_experts([a, b], class_axis=1)
    np.testing.assert_allclose(by_rows, expected, rtol=1e-6, equal_nan=True)
    assert np.isnan(by_rows[2]).all() and np.isfinite(np.delete(by_rows, 2, axis=0)).all()
    np.testing.assert_array_equal(combine_experts([a, b], class_axis=-1), by_rows)
    np.testing.assert_array_equal(combine_experts([a.T, b.T], class_axis=0), by_rows.T)
    with pytest.raises(ValueError, match="outside the arrays' 2 axes"):
        combine_experts([a, b], class_axis=2)


def test_weighted_experts_and_equal_weights() -> None:
    """``weights``: the weighted mean log-probability, renormalised; weights [2, 2] are the
    plain product of two; a weight 0 leaves that model out; bad weights are one-line errors."""
    rng = np.random.default_rng(1)
    a, b, c = (rng.dirichlet(np.ones(4), size=6) for _ in range(3))
    expected = a * b * np.sqrt(c)
    expected = expected ** (1 / 2.5)
    expected /= expected.sum(axis=1, keepdims=True)
    got = combine_experts([a, b, c], class_axis=1, weights=[1.0, 1.0, 0.5])
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(
        combine_experts([a, b], class_axis=1, weights=[2, 2]),
        combine_experts([a, b], class_axis=1),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        combine_experts([a, b, c], class_axis=1, weights=[1, 1, 0]),
        combine_experts([a, b], class_axis=1),
        rtol=1e-6,
    )
    for bad in ([1.0], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="weight"):
            combine_experts([a, b], class_axis=1, weights=bad)


def test_the_similarity_expert_is_the_softmax_of_similarity_over_temperature() -> None:
    """``similarity_expert_head`` in the search head's form: class logit ``(s_c - ceiling)/T``,
    background's 0, no counter-examples; so its probabilities are the softmax of ``s_c / T``
    beside a background logit ``ceiling / T``, and a class's log-odds against the background
    grow with its own similarity."""
    import torch

    from simsearch_wsi.search.probe import MemoryHead
    from simsearch_wsi.train.ensemble import similarity_expert_head

    weight, bias = similarity_expert_head(3, 2, temperature=0.1, ceiling=1.0)
    assert torch.equal(weight[:, 1], torch.zeros(3)) and weight[2, 0] == 0 and bias[2] == 0
    head = MemoryHead(torch.eye(4)[:2], torch.tensor([0, 1]), weight[:, 0], bias, 2, weight[:, 1])
    s = torch.tensor([[0.9, 0.2, -1.0], [0.5, 0.6, -1.0]])
    got = torch.softmax(head.logits(s, torch.full_like(s, 0.7)), dim=1)
    z = torch.cat([s[:, :2] / 0.1, torch.full((2, 1), 1.0 / 0.1)], dim=1)
    torch.testing.assert_close(got, torch.softmax(z, dim=1))
    with pytest.raises(ValueError, match="temperature"):
        similarity_expert_head(3, 2, temperature=0.0, ceiling=1.0)
