"""Contrastive losses: NT-Xent and supervised contrastive with negatives, vs naive references."""

from __future__ import annotations

import math

import pytest
import torch

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.train.losses import nt_xent, supcon

# --------------------------------------------------------------------------- naive references


def _unit(z: torch.Tensor) -> torch.Tensor:
    return z / z.norm(dim=1, keepdim=True)


def ref_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    z = _unit(torch.cat([z1, z2]).double())
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        p = (i + n) % n2
        num = math.exp(float(z[i] @ z[p]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(num / den)
    return total / n2


def ref_supcon(
    z: torch.Tensor,
    labels: list[int],
    t: float,
    negatives: torch.Tensor | None = None,
    negative_labels: list[int] | None = None,
) -> float:
    zn = _unit(z.double())
    negn = _unit(negatives.double()) if negatives is not None else None
    n = zn.shape[0]
    losses = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        den = sum(math.exp(float(zn[i] @ zn[a]) / t) for a in range(n) if a != i)
        if negn is not None and negative_labels is not None:
            den += sum(
                math.exp(float(zn[i] @ negn[m]) / t)
                for m in range(negn.shape[0])
                if negative_labels[m] == labels[i]
            )
        li = -sum(math.log(math.exp(float(zn[i] @ zn[p]) / t) / den) for p in positives)
        losses.append(li / len(positives))
    return sum(losses) / len(losses) if losses else 0.0


# --------------------------------------------------------------------------- NT-Xent


@pytest.mark.parametrize(
    ("n", "d", "t"), [(2, 3, 0.5), (5, 8, 0.5), (16, 32, 0.1), (7, 4, 1.0), (9, 16, 0.07)]
)
def test_nt_xent_matches_reference(n: int, d: int, t: float) -> None:
    g = torch.Generator().manual_seed(n * 100 + d)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    got = nt_xent(z1.double(), z2.double(), temperature=t)
    assert got.ndim == 0
    assert float(got) == pytest.approx(ref_nt_xent(z1, z2, t), rel=1e-10, abs=1e-12)
    got32 = nt_xent(z1, z2, temperature=t)
    assert float(got32) == pytest.approx(ref_nt_xent(z1, z2, t), rel=1e-4)


@pytest.mark.parametrize("n", [2, 3, 10])
def test_nt_xent_identical_embeddings(n: int) -> None:
    z = torch.ones(n, 6, dtype=torch.float64)
    got = nt_xent(z, 3.0 * z, temperature=0.5)
    assert float(got) == pytest.approx(math.log(2 * n - 1), rel=1e-12)


def test_nt_xent_separated_pairs_tiny_temperature() -> None:
    # Each pair is its own orthogonal direction: the positive dominates every denominator.
    z = torch.eye(6, dtype=torch.float64)
    got = nt_xent(z, z.clone(), temperature=0.01)
    assert 0.0 <= float(got) < 1e-20


def test_nt_xent_scale_invariance_and_gradients() -> None:
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    loss = nt_xent(z1, z2)
    scaled = nt_xent(z1.detach() * 7.5, z2.detach() * 0.01)
    assert loss.item() == pytest.approx(float(scaled), rel=1e-12)
    loss.backward()
    assert z1.grad is not None and z2.grad is not None
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    assert z1.grad.abs().sum() > 0


def test_nt_xent_stable_at_small_temperature() -> None:
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    got = nt_xent(z1, z2, temperature=1e-4)
    assert torch.isfinite(got)


@pytest.mark.parametrize(
    ("z1", "z2", "t"),
    [
        (torch.randn(1, 4), torch.randn(1, 4), 0.5),  # N < 2
        (torch.randn(3, 4), torch.randn(4, 4), 0.5),  # shapes differ
        (torch.randn(3, 4), torch.randn(3, 5), 0.5),
        (torch.randn(3), torch.randn(3), 0.5),  # not 2-D
        (torch.randn(3, 4), torch.randn(3, 4), 0.0),  # temperature
        (torch.randn(3, 4), torch.randn(3, 4), -1.0),
        (torch.randn(3, 4), torch.randn(3, 4), float("nan")),
        (torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 4, dtype=torch.int64), 0.5),
    ],
)
def test_nt_xent_errors(z1: torch.Tensor, z2: torch.Tensor, t: float) -> None:
    with pytest.raises(ConfigError):
        nt_xent(z1, z2, temperature=t)


# --------------------------------------------------------------------------- SupCon


@pytest.mark.parametrize(
    ("n", "d", "classes", "t"),
    [(4, 3, 2, 0.07), (12, 8, 3, 0.07), (10, 16, 4, 0.5), (7, 5, 2, 1.0), (20, 32, 5, 0.2)],
)
def test_supcon_matches_reference_without_negatives(n: int, d: int, classes: int, t: float) -> None:
    g = torch.Generator().manual_seed(n + 10 * d)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    got = supcon(z, labels, temperature=t)
    expected = ref_supcon(z, labels.tolist(), t)
    assert float(got) == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize(
    ("n", "m", "d", "t"), [(6, 3, 4, 0.07), (12, 10, 8, 0.1), (9, 1, 3, 0.5), (15, 20, 16, 1.0)]
)
def test_supcon_matches_reference_with_negatives(n: int, m: int, d: int, t: float) -> None:
    g = torch.Generator().manual_seed(n * m + d)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (n,), generator=g)
    negatives = torch.randn(m, d, generator=g, dtype=torch.float64)
    # Class 3 never occurs in the batch: those negatives must not change anything.
    negative_labels = torch.randint(0, 4, (m,), generator=g)
    got = supcon(z, labels, negatives=negatives, negative_labels=negative_labels, temperature=t)
    expected = ref_supcon(z, labels.tolist(), t, negatives, negative_labels.tolist())
    assert float(got) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_supcon_negatives_of_absent_class_change_nothing() -> None:
    g = torch.Generator().manual_seed(11)
    z = torch.randn(8, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    base = supcon(z, labels)
    negatives = torch.randn(5, 4, generator=g, dtype=torch.float64)
    with_absent = supcon(
        z, labels, negatives=negatives, negative_labels=torch.full((5,), 7, dtype=torch.int64)
    )
    assert float(with_absent) == float(base)
    empty = supcon(
        z,
        labels,
        negatives=torch.zeros(0, 4, dtype=torch.float64),
        negative_labels=torch.zeros(0, dtype=torch.int64),
    )
    assert float(empty) == float(base)


def test_supcon_anchors_without_positives_are_skipped() -> None:
    g = torch.Generator().manual_seed(12)
    z = torch.randn(7, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2, 3, 3, 3])  # classes 1 and 2 are singletons
    negatives = torch.randn(4, 5, generator=g, dtype=torch.float64)
    negative_labels = torch.tensor([1, 2, 3, 0])
    got = supcon(z, labels, negatives=negatives, negative_labels=negative_labels, temperature=0.3)
    expected = ref_supcon(z, labels.tolist(), 0.3, negatives, negative_labels.tolist())
    assert float(got) == pytest.approx(expected, rel=1e-10)


def test_supcon_no_positive_anywhere_gives_differentiable_zero() -> None:
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    negatives = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    loss = supcon(z, torch.arange(4), negatives=negatives, negative_labels=torch.tensor([0, 1]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert z.grad is not None and torch.equal(z.grad, torch.zeros_like(z))
    single = supcon(torch.randn(1, 3, requires_grad=True), torch.tensor([0]))
    assert single.item() == 0.0 and single.requires_grad


def test_supcon_identical_embeddings_closed_form() -> None:
    # N = 5, labels [0, 0, 0, 1, 2]; negatives: two of class 0, one of class 2, one of class 9.
    # Anchors with positives: the three of class 0 (|A| = 4, |N(0)| = 2, each term log 6).
    # The class-1 and class-2 anchors have no positive and are left out.
    z = torch.ones(5, 3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])[:, None]
    labels = torch.tensor([0, 0, 0, 1, 2])
    negatives = torch.ones(4, 3, dtype=torch.float64)
    negative_labels = torch.tensor([0, 0, 2, 9])
    got = supcon(z, labels, negatives=negatives, negative_labels=negative_labels, temperature=0.07)
    assert float(got) == pytest.approx(math.log(6.0), rel=1e-12)

    # General formula: mean over anchors with positives of log(|A(i)| + |N(y_i)|).
    g = torch.Generator().manual_seed(13)
    n, m = 11, 6
    labels = torch.randint(0, 3, (n,), generator=g)
    negative_labels = torch.randint(0, 4, (m,), generator=g)
    z = torch.full((n, 4), 0.3, dtype=torch.float64)
    negatives = torch.full((m, 4), 2.0, dtype=torch.float64)
    terms = []
    for i in range(n):
        if int((labels == labels[i]).sum()) > 1:
            terms.append(math.log((n - 1) + int((negative_labels == labels[i]).sum())))
    got = supcon(z, labels, negatives=negatives, negative_labels=negative_labels, temperature=0.5)
    assert float(got) == pytest.approx(sum(terms) / len(terms), rel=1e-12)


def test_supcon_separated_classes_tiny_temperature_near_minimum() -> None:
    # Two classes, each with 3 identical views on its own orthogonal axis. The minimum of the
    # loss is log(|P(i)|) = log 2 (the denominator still holds every positive).
    z = torch.zeros(6, 4, dtype=torch.float64)
    z[:3, 0] = 1.0
    z[3:, 1] = 1.0
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    got = supcon(z, labels, temperature=0.01)
    assert float(got) == pytest.approx(math.log(2.0), abs=1e-12)
    # A random embedding is well above it.
    rand = supcon(torch.randn(6, 4, dtype=torch.float64), labels, temperature=0.01)
    assert float(rand) > float(got)


def test_supcon_negative_equal_to_positive_increases_loss() -> None:
    g = torch.Generator().manual_seed(14)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    base = supcon(z, labels, temperature=0.1)
    # A negative of class 0 that equals anchor 0's positive (row 1).
    harder = supcon(
        z, labels, negatives=z[1:2].clone(), negative_labels=torch.tensor([0]), temperature=0.1
    )
    assert float(harder) > float(base)


def test_supcon_scale_invariance_and_gradients() -> None:
    g = torch.Generator().manual_seed(15)
    z = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    negatives = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (10,), generator=g)
    negative_labels = torch.tensor([0, 1, 2, 0])
    loss = supcon(z, labels, negatives=negatives, negative_labels=negative_labels)
    scaled = supcon(
        z.detach() * 42.0,
        labels,
        negatives=negatives.detach() * 0.001,
        negative_labels=negative_labels,
    )
    assert loss.item() == pytest.approx(float(scaled), rel=1e-12)
    loss.backward()
    assert z.grad is not None and negatives.grad is not None
    assert torch.isfinite(z.grad).all() and torch.isfinite(negatives.grad).all()
    assert z.grad.abs().sum() > 0 and negatives.grad.abs().sum() > 0


def test_supcon_stable_at_small_temperature() -> None:
    g = torch.Generator().manual_seed(16)
    z = torch.randn(8, 4, generator=g, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss = supcon(z, labels, temperature=1e-4)
    loss.backward()
    assert torch.isfinite(loss) and z.grad is not None and torch.isfinite(z.grad).all()


def test_supcon_errors() -> None:
    z = torch.randn(4, 3)
    labels = torch.tensor([0, 0, 1, 1])
    neg = torch.randn(2, 3)
    neg_labels = torch.tensor([0, 1])
    bad_calls = [
        lambda: supcon(torch.randn(4), labels),  # z not 2-D
        lambda: supcon(torch.ones(4, 3, dtype=torch.int64), labels),  # z not floating
        lambda: supcon(torch.randn(0, 3), torch.zeros(0, dtype=torch.int64)),  # empty
        lambda: supcon(z, torch.tensor([0, 0, 1])),  # label count
        lambda: supcon(z, labels.float()),  # float labels
        lambda: supcon(z, labels.bool()),  # bool labels
        lambda: supcon(z, labels[:, None]),  # 2-D labels
        lambda: supcon(z, labels, negatives=neg),  # negatives without labels
        lambda: supcon(z, labels, negative_labels=neg_labels),  # labels without negatives
        lambda: supcon(z, labels, negatives=torch.randn(2, 4), negative_labels=neg_labels),
        lambda: supcon(z, labels, negatives=neg, negative_labels=torch.tensor([0, 1, 2])),
        lambda: supcon(z, labels, negatives=neg, negative_labels=neg_labels.float()),
        lambda: supcon(z, labels, temperature=0.0),
        lambda: supcon(z, labels, temperature=-0.1),
        lambda: supcon(z, labels, temperature=float("inf")),
    ]
    for call in bad_calls:
        with pytest.raises(ConfigError):
            call()
    # ConfigError is also a ValueError.
    with pytest.raises(ValueError):
        supcon(z, labels, temperature=0.0)
