"""Masked-image modelling for a convolutional trunk (the self-supervised objective of Microsnoop,
in its simplest form for a stride-16 CNN).

Each crop is cut into ``stride x stride`` cells (one per trunk output cell). A random
``mask_ratio`` of the cells is blanked (set to 0 after the trunk's input normalisation, i.e. to
the mean colour) and the trunk must tell, from the visible context around each blanked cell, what
it held: a light decoder (1x1 conv, GELU, 1x1 conv to ``3 * stride^2`` values, pixel shuffle)
predicts every cell's pixels from its feature vector, and the loss is the mean squared error on
the blanked cells only, against targets standardised per cell (MAE's normalised-pixel loss: the
texture, not the cell's mean colour, has to be predicted).

Inputs are what the trunk sees (:func:`simsearch_wsi.features.extractor.trunk_input`), so RGB and
grey (one fluorescence channel) crops train the same way. Frames: crops are (N, 3, S, S) with
``S`` a multiple of the stride; the trunk gives (N, D, S/stride, S/stride).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simsearch_wsi.core.errors import ConfigError


class PixelDecoder(nn.Module):
    """(N, D, h, w) cell features -> (N, 3, h * stride, w * stride) predicted pixels."""

    def __init__(self, in_dim: int, stride: int, *, hidden_dim: int = 256) -> None:
        super().__init__()
        self.stride = stride
        self.hidden = nn.Conv2d(in_dim, hidden_dim, 1)
        self.out = nn.Conv2d(hidden_dim, 3 * stride * stride, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.out(F.gelu(self.hidden(f))), self.stride)


def random_cell_mask(
    n: int, h: int, w: int, *, ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """(n, h, w) bool: exactly ``round(ratio * h * w)`` (at least 1) cells per sample are True."""
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"mask ratio must be in (0, 1), got {ratio}")
    cells = h * w
    k = min(max(1, round(ratio * cells)), cells - 1)
    order = torch.rand(n, cells, generator=generator).argsort(dim=1)
    mask = torch.zeros(n, cells, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask.view(n, h, w)


def cells_of(x: torch.Tensor, stride: int) -> torch.Tensor:
    """(N, C, S, S) -> (N, h, w, C * stride^2): the pixels of each ``stride``-sided cell."""
    n, c, hs, ws = x.shape
    h, w = hs // stride, ws // stride
    return x.reshape(n, c, h, stride, w, stride).permute(0, 2, 4, 1, 3, 5).reshape(n, h, w, -1)


def cell_targets(x: torch.Tensor, stride: int) -> torch.Tensor:
    """(N, 3, S, S) -> (N, h, w, 3 * stride^2) pixels of each cell, standardised per cell."""
    cells = cells_of(x, stride)
    mean = cells.mean(dim=-1, keepdim=True)
    var = cells.var(dim=-1, keepdim=True, unbiased=False)
    return (cells - mean) / torch.sqrt(var + 1e-6)


def masked_loss(
    trunk: nn.Module,
    decoder: PixelDecoder,
    *,
    x: torch.Tensor,
    stride: int,
    mask_ratio: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """The masked-modelling loss of a batch ``x`` (N, 3, S, S) of trunk inputs (module
    docstring); differentiable in the trunk and the decoder."""
    n, _, hs, ws = x.shape
    if hs % stride or ws % stride:
        raise ConfigError(f"crops must be a multiple of the stride {stride}, got {hs}x{ws}")
    h, w = hs // stride, ws // stride
    mask = random_cell_mask(n, h, w, ratio=mask_ratio, generator=generator).to(x.device)
    pixel_mask = mask.repeat_interleave(stride, dim=1).repeat_interleave(stride, dim=2)
    visible = x.masked_fill(pixel_mask[:, None], 0.0)
    f = trunk(visible.contiguous(memory_format=torch.channels_last))
    if f.shape[-2:] != (h, w):
        raise ConfigError(f"the trunk gave a {tuple(f.shape[-2:])} grid for {h}x{w} cells")
    pred = cells_of(decoder(f.float()), stride)
    target = cell_targets(x.float(), stride)
    err = ((pred - target) ** 2).mean(dim=-1)  # (N, h, w)
    return err[mask].mean()
