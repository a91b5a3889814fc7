r"""Contrastive losses of the training stages (SimSearch paper, section 2 and eq. 3-4).

Both losses L2-normalise their inputs, so ``z_i . z_j`` below is a cosine similarity, and both are
computed for the whole batch at once with masks and ``logsumexp`` (numerically stable at small
temperatures).

NT-Xent (SimCLR, self-supervised stage). ``z1`` and ``z2`` are ``(N, D)`` projections of two views
of the same ``N`` samples; stacked they form ``2N`` anchors, and the positive ``p(i)`` of anchor
``i`` is the other view of the same sample::

    l_i = -log( exp(z_i . z_p(i) / t) / sum_{k != i} exp(z_i . z_k / t) )
    L   = 1/(2N) * sum_i l_i

With all embeddings identical every term is ``log(2N - 1)``.

Supervised contrastive loss with negatives (Khosla et al. 2020, "L_out" form, extended as in the
SimSearch paper, eq. 3-4). ``z`` is ``(N, D)`` (all augmented views stacked) with class labels
``y``; optional user-flagged negatives ``n`` with labels ``y^neg`` enter the denominator of the
anchors of their class only (they are never anchors or positives)::

    P(i)  = {p != i : y_p = y_i}          A(i) = {a != i}
    N(c)  = {n : y^neg_n = c}
    D_i   = sum_{a in A(i)} exp(z_i . z_a / t) + sum_{n in N(y_i)} exp(z_i . n / t)
    l_i   = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i . z_p / t) / D_i )
    L     = mean of l_i over the anchors with |P(i)| > 0

When no anchor has a positive the loss is a zero that is still connected to the graph. With all
embeddings identical, ``l_i = log(|A(i)| + |N(y_i)|)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from simsearch_wsi.core.errors import ConfigError

__all__ = ["nt_xent", "supcon"]


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ConfigError(f"temperature must be a positive number, got {temperature!r}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ConfigError(f"temperature must be a finite number > 0, got {t!r}")
    return t


def _check_embeddings(name: str, z: object) -> torch.Tensor:
    if not isinstance(z, torch.Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.ndim != 2 or not z.is_floating_point():
        raise ConfigError(
            f"{name} must be an (N, D) floating tensor, got {tuple(z.shape)} {z.dtype}"
        )
    if z.shape[1] < 1:
        raise ConfigError(f"{name} must have at least one feature column, got {tuple(z.shape)}")
    return z


def _check_labels(name: str, labels: object, n: int, z_name: str) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ConfigError(f"{name} must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape != (n,):
        raise ConfigError(
            f"{name} must have shape ({n},) to match {z_name}, got {tuple(labels.shape)}"
        )
    return labels


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy loss.

    Parameters
    ----------
    z1, z2
        ``(N, D)`` projections of two augmented views of the same ``N >= 2`` samples; row ``i``
        of ``z1`` and row ``i`` of ``z2`` are a positive pair. L2-normalised here.
    temperature
        Softmax temperature ``t > 0`` (the paper uses 0.5).

    Returns
    -------
    torch.Tensor
        0-dim tensor: the mean over the ``2N`` anchors (see the module docstring).

    Raises
    ------
    ConfigError
        On shapes that are not ``(N, D)``, that differ, ``N < 2``, or ``temperature <= 0``.
    """
    t = _check_temperature(temperature)
    z1 = _check_embeddings("z1", z1)
    z2 = _check_embeddings("z2", z2)
    if z1.shape != z2.shape:
        raise ConfigError(
            f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    n = z1.shape[0]
    if n < 2:
        raise ConfigError(f"nt_xent needs a batch of at least 2 samples, got N = {n}")
    z = F.normalize(torch.cat([z1, z2.to(z1.dtype)], dim=0), dim=1)  # (2N, D)
    logits = z @ z.T / t  # (2N, 2N)
    idx = torch.arange(2 * n, device=z.device)
    positive = logits[idx, (idx + n) % (2 * n)]  # (2N,)
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    log_denominator = torch.logsumexp(logits.masked_fill(self_mask, -math.inf), dim=1)
    return (log_denominator - positive).mean()


def supcon(
    z: torch.Tensor,
    labels: torch.Tensor,
    *,
    negatives: torch.Tensor | None = None,
    negative_labels: torch.Tensor | None = None,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Supervised contrastive loss with class-specific negatives in the denominator.

    Parameters
    ----------
    z
        ``(N, D)`` projections of all augmented views, stacked; L2-normalised here.
    labels
        ``(N,)`` integer (int64) class of each row of ``z``.
    negatives
        Optional ``(M, D)`` projections of user-flagged negatives; L2-normalised here. A negative
        is added to the denominator of the anchors whose class equals its label; it is never an
        anchor or a positive. ``M`` may be 0.
    negative_labels
        ``(M,)`` integer class that each negative is a negative *of*; required with
        ``negatives``. Labels of classes absent from the batch are allowed (they affect nothing).
    temperature
        Softmax temperature ``t > 0`` (the paper uses 0.07).

    Returns
    -------
    torch.Tensor
        0-dim tensor: the mean of the per-anchor losses over anchors with at least one positive,
        or ``z.sum() * 0`` (still differentiable) when no anchor has one.

    Raises
    ------
    ConfigError
        On tensors of the wrong shape or dtype, on ``negatives`` without ``negative_labels`` (or
        the reverse), or on ``temperature <= 0``.
    """
    t = _check_temperature(temperature)
    z = _check_embeddings("z", z)
    n, d = z.shape
    if n < 1:
        raise ConfigError("supcon needs at least one row in z, got N = 0")
    labels = _check_labels("labels", labels, n, "z")
    if labels.device != z.device:
        raise ConfigError(f"labels are on {labels.device} but z is on {z.device}")
    if (negatives is None) != (negative_labels is None):
        raise ConfigError(
            "negatives and negative_labels must be given together (each negative needs the "
            "class it is a negative of)"
        )
    if negatives is not None and negative_labels is not None:
        negatives = _check_embeddings("negatives", negatives)
        if negatives.shape[1] != d:
            raise ConfigError(
                f"negatives must have D = {d} columns like z, got {tuple(negatives.shape)}"
            )
        negative_labels = _check_labels(
            "negative_labels", negative_labels, negatives.shape[0], "negatives"
        )
        if negatives.device != z.device or negative_labels.device != z.device:
            raise ConfigError(
                f"negatives and negative_labels must be on z's device {z.device}, got "
                f"{negatives.device} and {negative_labels.device}"
            )

    same = labels[:, None] == labels[None, :]  # (N, N)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    positive_mask = same & ~self_mask
    n_positive = positive_mask.sum(dim=1)  # (N,)
    anchors = n_positive > 0
    if not bool(anchors.any()):
        zero = z.sum() * 0.0
        return zero + negatives.sum() * 0.0 if negatives is not None else zero

    # Only anchors with a positive: their denominator holds at least that positive, so every
    # logsumexp below is finite and no NaN can leak into the gradient.
    zn = F.normalize(z, dim=1)
    za = zn[anchors]  # (Q, D)
    logits = za @ zn.T / t  # (Q, N)
    denominator = logits.masked_fill(self_mask[anchors], -math.inf)
    if negatives is not None and negative_labels is not None and negatives.shape[0] > 0:
        nn_ = F.normalize(negatives.to(z.dtype), dim=1)
        own_class = negative_labels[None, :] == labels[anchors][:, None]  # (Q, M)
        neg_logits = (za @ nn_.T / t).masked_fill(~own_class, -math.inf)
        denominator = torch.cat([denominator, neg_logits], dim=1)  # (Q, N + M)
    log_denominator = torch.logsumexp(denominator, dim=1)  # (Q,)
    pos = positive_mask[anchors]
    count = n_positive[anchors].to(logits.dtype)
    mean_positive_logit = (logits * pos).sum(dim=1) / count  # (Q,)
    return (log_denominator - mean_positive_logit).mean()
