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
