"""Feature normalisation before pooling and cosine similarity: what the query's vectors are
compared in.

Trunk features share a large common component (cosine above 0.97 between unrelated patches with
random weights) and vary in scale from channel to channel, so the raw cosine mostly measures
"is this tissue". The options, each using the statistics of the image a vector comes from (so a
prototype drawn on another slide is normalised with its own slide's statistics, which also takes
out per-slide stain and scanner shifts):

``none``
    raw pooled vectors (the paper's cosine), for comparison.
``standardize``
    per channel: subtract the image's mean, divide by its standard deviation.
``whiten``
    standardise, then decorrelate the channels with a shrunk ZCA transform
    ``U (L + s I)^-1/2 U^T`` of the image's channel correlation matrix ``U L U^T`` (``s`` =
    :data:`WHITEN_SHRINKAGE`, relative to the mean eigenvalue, which is 1): correlated channels
    stop counting several times, and the shrinkage keeps near-empty directions (noise) from
    being blown up. Maps of more than :data:`WHITEN_MAX_DIM` dimensions (highly multiplexed
    images) are standardised only.

All three are affine maps of the feature vector, and the pooling kernel sums to 1, so applying
them to pooled vectors equals applying them to the feature map before pooling. Statistics are
over every embedded cell of the image's cached map; the whitening transform is cached beside the
map (``<entry>.zca-<s>.npy``, written atomically).

``docs/evaluation.md`` (section "Feature options") has the measurement that chose the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray

from simsearch_wsi.core.atomic import atomic_path
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.features.cache import FeatureMap

FeatureNorm = Literal["none", "standardize", "whiten"]
FEATURE_NORMS: tuple[FeatureNorm, ...] = ("none", "standardize", "whiten")
DEFAULT_FEATURE_NORM: FeatureNorm = "whiten"
#: ZCA shrinkage, as a fraction of the mean eigenvalue of the correlation matrix (which is 1)
WHITEN_SHRINKAGE = 1.0
#: above this many dimensions (16 fluorescence channels of 256) ``whiten`` standardises only: the
#: (D, D) correlation and its eigendecomposition would cost more than they are worth
WHITEN_MAX_DIM = 4096


def check_feature_norm(name: str) -> FeatureNorm:
    """``name`` as a :data:`FeatureNorm`, or a :class:`ConfigError` listing the options."""
    if name not in FEATURE_NORMS:
        raise ConfigError(
            f"unknown feature normalisation {name!r}; use one of {', '.join(FEATURE_NORMS)}"
        )
    return name  # type: ignore[return-value]  # narrowed by the membership test


def feature_norm_tag(name: str) -> str:
    """Short tag of a normalisation for cache file names (``raw`` and ``std`` predate the
    option and are kept, so existing pooled caches stay valid)."""
    norm = check_feature_norm(name)
    return {"none": "raw", "standardize": "std"}.get(norm, f"zca{WHITEN_SHRINKAGE:g}")


@dataclass(frozen=True)
class FeatureNormalizer:
    """An affine map ``v -> T (v - mean) / std`` then unit length; fields ``None`` = identity.

    ``mean``, ``std``: (D,); ``transform``: (D, D) acting on standardised vectors.
    """

    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    transform: torch.Tensor | None = None

    @classmethod
    def of(cls, fmap: FeatureMap, norm: str = DEFAULT_FEATURE_NORM) -> FeatureNormalizer:
        """The normaliser ``norm`` with the statistics of ``fmap``'s image."""
        norm = check_feature_norm(norm)
        if norm == "none":
            return cls()
        mean = torch.from_numpy(fmap.channel_mean)
        std = torch.from_numpy(fmap.channel_std)
        if norm == "standardize" or fmap.shape[2] > WHITEN_MAX_DIM:
            return cls(mean, std)
        return cls(mean, std, torch.from_numpy(whitening_transform(fmap, WHITEN_SHRINKAGE)))

    def __call__(self, vectors: torch.Tensor, dim: int) -> torch.Tensor:
        """Normalise along ``dim`` (the channel axis of any-shaped ``vectors``), then scale each
        vector to unit length."""
        if self.mean is not None and self.std is not None:
            shape = [1] * vectors.dim()
            shape[dim] = -1
            vectors = (vectors - self.mean.view(shape)) / self.std.view(shape)
        if self.transform is not None:
            moved = vectors.movedim(dim, -1)
            vectors = (moved @ self.transform.T.to(moved.dtype)).movedim(-1, dim)
        unit: torch.Tensor = vectors / vectors.norm(dim=dim, keepdim=True).clamp_min(1e-12)
        return unit


def channel_correlation(fmap: FeatureMap) -> NDArray[np.float64]:
    """(D, D) correlation matrix of the standardised channels over every embedded cell,
    streamed tile by tile (the map is never loaded whole)."""
    d = fmap.shape[2]
    mean = fmap.channel_mean.astype(np.float64)
    std = fmap.channel_std.astype(np.float64)
    tc = fmap.tile_cells
    second = np.zeros((d, d), np.float64)
    n = 0
    for ty, tx in zip(*np.nonzero(fmap.computed), strict=True):
        y0, x0 = int(ty) * tc, int(tx) * tc
        block = fmap.read_cells(y0, y0 + tc, x0, x0 + tc).reshape(-1, d)
        z = (block.astype(np.float64) - mean) / std
        second += z.T @ z
        n += z.shape[0]
    if n == 0:
        return np.eye(d)
    return second / n


def zca_transform(correlation: NDArray[Any], shrinkage: float) -> NDArray[np.float32]:
    """``U (L + s I)^-1/2 U^T`` for ``correlation = U L U^T`` (D, D), with ``s = shrinkage``
    times the mean eigenvalue."""
    c = np.asarray(correlation, dtype=np.float64)
    c = (c + c.T) / 2.0
    eigval, eigvec = np.linalg.eigh(c)
    eigval = np.clip(eigval, 0.0, None)
    s = shrinkage * max(float(eigval.mean()), 1e-12)
    out: NDArray[np.float64] = (eigvec / np.sqrt(eigval + s)) @ eigvec.T
    return out.astype(np.float32)


def whitening_transform(fmap: FeatureMap, shrinkage: float) -> NDArray[Any]:
    """(D, D) ZCA transform of ``fmap``'s image, computed once and cached beside the entry."""
    path = fmap.path.with_name(f"{fmap.path.name}.zca-{shrinkage:g}.npy")
    if path.is_file():
        try:
            cached: NDArray[Any] = np.load(path)
            if cached.shape == (fmap.shape[2], fmap.shape[2]):
                return cached
        except (OSError, ValueError):
            pass  # unreadable: compute it again
    transform = zca_transform(channel_correlation(fmap), shrinkage)
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.save(fh, transform)
    return transform
