"""A classifier on the similarity search's own window vectors (the "search head").

The similarity search compares unit-length, per-image normalised, Gaussian-pooled trunk vectors
(:mod:`simsearch_wsi.features.norm`, :func:`simsearch_wsi.search.similarity.pooled_map`) with the
prototypes. The search head keeps doing exactly that, with everything the user labelled as a
memory of such vectors:

* for each class ``c``: ``pos_c(v)`` = the highest cosine similarity of window ``v`` to the
  class's prototypes and approved suggestions; ``neg_c(v)`` = the highest cosine to anything the
  user said is *not* ``c``: positives of other classes, confirmed background, and the
  suggestions rejected for ``c`` (a look-alike the user flagged pushes down its neighbourhood);
* the margin ``m_c = pos_c - neg_c`` is calibrated per class, ``logit_c = a_c m_c + b_c``
  (background's logit is 0), and a softmax gives the class probabilities.

Unlike a linear layer, whose half-space also takes in whatever lies beyond the labels (a filled
disc "is more ring than anything else"), the memory scores a window by how close it is to the
class *and* how much closer to it than to the nearest counter-example: bounded, local and
learned from a handful of labels. A linear probe on the same vectors, tried first, lost to the
search alone for exactly that reason (docs/evaluation.md, "Training study").

Only ``2 K`` numbers are fitted (full-batch L-BFGS in float32 on leave-one-out margins: each
labelled patch is scored without its own memory entries), so a fit takes well under a second
and is identical on CPUs with and without native bf16.

Dense application (:func:`memory_logits_map`) reads the cached feature map band by band,
normalises and pools each band in float32 and compares it with the memory: memory use is
``K`` floats per window plus one band of cells.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.features.cache import FeatureMap
from simsearch_wsi.features.norm import FeatureNormalizer
from simsearch_wsi.search.similarity import (
    PatchGeometry,
    iter_pooled_blocks,
    pooled_hw,
    valid_windows,
)

#: each labelled patch enters the memory in this many rotations (0, 90, 180, 270 degrees), as
#: the search embeds its prototypes
MEMORY_ROTATIONS = 4
#: the margin's scale before fitting (cosine differences of 0.1 = a factor e in odds)
INITIAL_SCALE = 10.0
#: the counter-examples' weight starts at softplus(-4) = 0.018 x (the search alone)
INITIAL_RAW_NEG = -4.0
#: L2 penalty on the counter-examples' weights (they generalise less well than the similarity to
#: the class: a large weight fitted on the reviewed image cost held-out PR-AUC, training study)
COUNTER_L2 = 0.03
#: L2 penalty on the fitted scales and biases (around their start), relative to the data term
CALIBRATION_L2 = 1e-3
#: total weight of the unlabelled windows (as background) in the calibration, relative to one
#: labelled group (a class's positives, the rejected suggestions of a class, ...)
UNLABELLED_WEIGHT = 1.0


@dataclass(frozen=True)
class MemoryHead:
    """The search head (module docstring).

    ``vectors`` (M, D) unit window vectors; ``owner`` (M,) int64: ``k`` in ``[0, K)`` = a
    positive of class ``k`` (background included), ``K + k`` = rejected for class ``k``;
    ``scale`` and ``bias`` (K,) the calibration (background's entries 0); ``background`` the
    index of the background class (``-1``: none)."""

    vectors: torch.Tensor
    owner: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    background: int
    neg_weight: torch.Tensor | None = None

    @property
    def n_classes(self) -> int:
        return int(self.scale.shape[0])

    def similarities(
        self, vectors: torch.Tensor, *, exclude: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``pos`` and ``neg`` (N, K) of unit vectors (N, D) (module docstring; -1 where a class
        has no such entries, background's columns -1); ``exclude`` (N, M) bool masks memory
        entries out per row (leave-one-out)."""
        sims = vectors.float() @ self.vectors.float().T  # (N, M)
        if exclude is not None:
            sims = sims.masked_fill(exclude, -2.0)
        k = self.n_classes
        pos = torch.full((len(vectors), k), -1.0)
        neg = torch.full((len(vectors), k), -1.0)
        owner = self.owner
        for c in range(k):
            if c == self.background:
                continue
            is_pos = owner == c
            is_neg = ((owner < k) & (owner != c)) | (owner == k + c)
            if bool(is_pos.any()):
                pos[:, c] = sims[:, is_pos].amax(dim=1).clamp_min(-1.0)
            if bool(is_neg.any()):
                neg[:, c] = sims[:, is_neg].amax(dim=1).clamp_min(-1.0)
        return pos, neg

    def logits(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """(N, K) logits ``a_c pos_c - g_c neg_c + b_c`` (background's logit 0)."""
        g = self.neg_weight if self.neg_weight is not None else torch.zeros_like(self.scale)
        out = pos * self.scale - neg * g + self.bias
        if self.background >= 0:
            out[:, self.background] = 0.0
        return out

    def probabilities(self, vectors: torch.Tensor) -> NDArray[np.float32]:
        """Softmax probabilities (N, K) of unit vectors (N, D)."""
        p: NDArray[np.float32] = (
            torch.softmax(self.logits(*self.similarities(vectors)), dim=1)
            .numpy()
            .astype(np.float32)
        )
        return p


def window_indices(
    centers_a: NDArray[np.float64], geometry: PatchGeometry, *, pooled_hw: tuple[int, int]
) -> NDArray[np.int64]:
    """(N, 2) pooled-window indices (i, j) of analysis-pixel centres ``centers_a`` (N, 2) as
    (x, y), clipped to the ``(Hp, Wp)`` windows of the map."""
    kh, kw = geometry.kernel_hw
    s = geometry.stride
    i = np.rint(centers_a[:, 1] / s - kh / 2).astype(np.int64)
    j = np.rint(centers_a[:, 0] / s - kw / 2).astype(np.int64)
    hp, wp = pooled_hw
    return np.stack([np.clip(i, 0, hp - 1), np.clip(j, 0, wp - 1)], axis=1)


def window_vectors(
    fmap: FeatureMap,
    geometry: PatchGeometry,
    *,
    normalizer: FeatureNormalizer,
    windows_ij: NDArray[np.int64],
) -> torch.Tensor:
    """Normalised unit vectors (N, D) float32 of pooled windows ``windows_ij`` (N, 2), computed
    from the cached cells exactly as :func:`probe_logits` computes them densely."""
    kh, kw = geometry.kernel_hw
    hf, wf, d = fmap.shape
    kernel = geometry.kernel()
    out = torch.empty(len(windows_ij), d)
    if not len(windows_ij):
        return out
    # read each needed band of cells once (samples sorted by row)
    order = np.argsort(windows_ij[:, 0], kind="stable")
    band_y0, band = -(10**9), np.empty((0, 0, d), np.float16)
    band_rows = max(fmap.tile_cells, kh)
    for n in order:
        i, j = int(windows_ij[n, 0]), int(windows_ij[n, 1])
        if not band_y0 <= i <= band_y0 + band.shape[0] - kh:
            band_y0 = i
            band = fmap.read_cells(i, min(i + band_rows + kh - 1, hf), 0, wf)
        cells = band[i - band_y0 : i - band_y0 + kh, j : j + kw].astype(np.float32)
        vec = (torch.from_numpy(cells) * kernel[..., None]).sum(dim=(0, 1))
        out[n] = vec
    return normalizer(out, dim=1)


def memory_logits_map(
    fmap: FeatureMap,
    geometry: PatchGeometry,
    *,
    normalizer: FeatureNormalizer,
    head: MemoryHead,
    progress: Callable[[str, int, int], None] | None = None,
) -> NDArray[np.float32]:
    """Logits (K, Hp, Wp) float32 of every pooled window, NaN where the window's centre cell was
    not embedded; ``Hp = H_f - kh + 1``, ``Wp = W_f - kw + 1`` (the windows of
    :func:`simsearch_wsi.search.similarity.similarity_maps`, same indexing)."""
    return memory_logits_maps(
        fmap, geometry, normalizer=normalizer, heads=[head], progress=progress
    )[0]


def memory_logits_maps(
    fmap: FeatureMap,
    geometry: PatchGeometry,
    *,
    normalizer: FeatureNormalizer,
    heads: Sequence[MemoryHead],
    progress: Callable[[str, int, int], None] | None = None,
) -> list[NDArray[np.float32]]:
    """:func:`memory_logits_map` of several heads over one pass of the pooled windows."""
    d = fmap.shape[2]
    for head in heads:
        if head.vectors.shape[1] != d:
            raise ConfigError(
                f"the model takes {head.vectors.shape[1]}-dim vectors, the feature map has {d}; "
                "it was trained with another backbone or channel selection"
            )
    hp, wp = pooled_hw(fmap, geometry)
    outs = [np.full((head.n_classes, hp, wp), np.nan, dtype=np.float32) for head in heads]
    blocks = iter_pooled_blocks(
        fmap, geometry, normalizer=normalizer, progress=progress, what="applying the model"
    )
    for y0, x0, vectors in blocks:
        _, h2, w2 = vectors.shape
        flat = vectors.reshape(d, -1).T
        for head, out in zip(heads, outs, strict=True):
            logits = head.logits(*head.similarities(flat))  # (h2 * w2, K)
            out[:, y0 : y0 + h2, x0 : x0 + w2] = logits.T.reshape(head.n_classes, h2, w2).numpy()
    valid = valid_windows(fmap, geometry)
    for out in outs:
        out[:, ~valid] = np.nan
    return outs


def _group_weights(groups: NDArray[np.int64]) -> torch.Tensor:
    """Per-sample weights making every group's total 1 / (number of groups)."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    w = 1.0 / (counts[inverse] * len(counts))
    return torch.from_numpy(w.astype(np.float32))


def fit_memory_head(
    vectors: torch.Tensor,
    labels: NDArray[np.int64],
    *,
    sample_ids: NDArray[np.int64],
    n_classes: int,
    background: int,
    negatives: torch.Tensor | None = None,
    negative_labels: NDArray[np.int64] | None = None,
    negative_ids: NDArray[np.int64] | None = None,
    unlabelled: torch.Tensor | None = None,
    unlabelled_weight: float = UNLABELLED_WEIGHT,
    max_iter: int = 100,
) -> MemoryHead:
    """The search head of labelled unit vectors (N, D) with labels (N,) in ``[0, n_classes)``
    and optional negatives (M, D) with the class (M,) each was rejected for. ``sample_ids``
    (N,) and ``negative_ids`` (M,) group the vectors of one labelled patch (its jittered
    windows): a patch is scored without its own group when the calibration is fitted.

    ``unlabelled`` (U, D): windows drawn at random from the reviewed images, which the user
    did not label. They calibrate the head against the image as a whole rather than against
    the few labelled patches alone: most windows of a slide are none of the user's classes, so
    they enter the calibration as background (one group of total weight
    ``unlabelled_weight``; they are not added to the memory). With only a few positives per
    class, the leave-one-out margins of the labelled patches alone put the class biases where
    a new slide's moderately similar windows already count as the class (docs/evaluation.md,
    "Training study"). Needs a background class."""
    if vectors.ndim != 2 or len(vectors) != len(labels) or len(labels) != len(sample_ids):
        raise ConfigError(
            f"fit_memory_head needs (N, D) vectors, (N,) labels and (N,) ids, got "
            f"{tuple(vectors.shape)}, {len(labels)} and {len(sample_ids)}"
        )
    d = vectors.shape[1]
    xn = negatives.float() if negatives is not None else torch.empty(0, d)
    yn = np.asarray(negative_labels if negative_labels is not None else [], dtype=np.int64)
    idn = np.asarray(negative_ids if negative_ids is not None else [], dtype=np.int64)
    if len(xn) != len(yn) or len(yn) != len(idn):
        raise ConfigError("negatives, their labels and their ids must have the same length")
    bank = torch.cat([vectors.float(), xn])
    owner = torch.from_numpy(np.concatenate([labels, yn + n_classes]).astype(np.int64))
    groups = torch.from_numpy(np.concatenate([sample_ids, idn + int(sample_ids.max()) + 1]))
    start = MemoryHead(
        bank,
        owner,
        torch.full((n_classes,), INITIAL_SCALE),
        torch.zeros(n_classes),
        background,
    )
    # leave-one-out similarities of every memory entry (its own group masked out)
    pos, neg = start.similarities(bank, exclude=groups[:, None] == groups[None, :])
    n_pos = len(vectors)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    yneg = torch.from_numpy(yn)
    owners = np.concatenate([labels, yn + n_classes]).astype(np.int64)
    weights = _group_weights(owners)
    use_unlabelled = unlabelled is not None and len(unlabelled) > 0 and background >= 0
    if use_unlabelled:
        assert unlabelled is not None
        if unlabelled.ndim != 2 or unlabelled.shape[1] != d:
            raise ConfigError(
                f"unlabelled windows must be (U, {d}) vectors, got {tuple(unlabelled.shape)}"
            )
        pos_u, neg_u = start.similarities(unlabelled.float())
        # the labelled groups keep their total 1; the unlabelled add ``unlabelled_weight`` of
        # one group's share
        w_u = unlabelled_weight / (len(np.unique(owners)) * len(unlabelled))
    log_scale = torch.full((n_classes,), float(np.log(INITIAL_SCALE)), requires_grad=True)
    # the weight of the counter-examples starts near 0: the head starts as the search
    raw_neg = torch.full((n_classes,), INITIAL_RAW_NEG, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    fg = torch.ones(n_classes, dtype=torch.bool)
    if background >= 0:
        fg[background] = False

    def calibrated_logp(p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (N, K) of similarities ``p`` and ``n`` (N, K) under the current
        calibration (background's logit 0), as :meth:`MemoryHead.logits`."""
        logits = p * log_scale.exp() - n * F.softplus(raw_neg) + bias
        return torch.log_softmax(torch.where(fg, logits, torch.zeros_like(logits)), dim=1)

    def total_loss() -> torch.Tensor:
        logp = calibrated_logp(pos, neg)
        loss = -(logp[:n_pos].gather(1, y[:, None])[:, 0] * weights[:n_pos]).sum()
        if len(yneg):
            p_y = logp[n_pos:].gather(1, yneg[:, None])[:, 0].exp()
            loss = loss - (torch.log1p(-p_y.clamp(max=1 - 1e-6)) * weights[n_pos:]).sum()
        if use_unlabelled:
            loss = loss - w_u * calibrated_logp(pos_u, neg_u)[:, background].sum()
        reg = (log_scale - float(np.log(INITIAL_SCALE))) ** 2 + bias**2
        counter = F.softplus(raw_neg) ** 2
        return loss + CALIBRATION_L2 * reg.sum() + COUNTER_L2 * counter.sum()

    opt = torch.optim.LBFGS(
        [log_scale, raw_neg, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def objective() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = total_loss()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(objective)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        scale = torch.where(fg, log_scale.exp(), torch.zeros_like(log_scale))
        b = torch.where(fg, bias, torch.zeros_like(bias))
        g = torch.where(fg, F.softplus(raw_neg), torch.zeros_like(bias))
    return MemoryHead(bank.contiguous(), owner, scale.detach(), b.detach(), background, g.detach())


def macro_average_precision(
    probs: NDArray[np.float32], labels: NDArray[np.int64], *, classes: Sequence[str], skip: str
) -> float:
    """Mean over classes (except ``skip``, e.g. background) present in ``labels`` of the
    average precision of ranking all samples by that class's probability; NaN when none is
    present. What model selection compares on held-out patches."""
    aps = []
    for c, name in enumerate(classes):
        if name == skip:
            continue
        truth = labels == c
        if not truth.any():
            continue
        order = np.argsort(-probs[:, c], kind="stable")
        hits = truth[order].astype(np.float64)
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return float(np.mean(aps)) if aps else float("nan")
