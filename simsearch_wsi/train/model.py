"""The patch model: trunk, centre-focused pooling, and the heads trained on top.

:class:`PatchEncoder` turns crops of ``side_a = window_a + 2 * context_a`` analysis pixels into one
vector per crop: the trunk runs over the whole crop (the patch sees its context, as it does when
the trunk runs densely over tiles), then the ``(kh, kw)`` feature cells of the centred patch
window are pooled with the same Gaussian kernel the similarity search uses
(:meth:`PatchGeometry.kernel`). Dense inference is therefore "trunk over tiles, pooling conv,
1x1 linear head" with exactly these weights.

Freezing (SimSearch): with pretrained trunk weights, conv1 and the first two blocks are frozen
(and their batch-norm statistics kept); with random weights nothing is frozen, since freezing
random filters would only cripple the model.
"""

from __future__ import annotations

import torch
from torch import nn

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.features.backbones import BackboneSpec
from simsearch_wsi.features.extractor import merge_channel_features, trunk_input
from simsearch_wsi.search.similarity import PatchGeometry

# Modules of a ResNet trunk frozen when its weights are pretrained (paper: conv1 + 2 blocks).
FROZEN_PREFIXES = ("conv1", "bn1", "layer1", "layer2")


class PatchEncoder(nn.Module):
    """Crops (N, C, S, S) in [0, 1] -> pooled features (N, D), ``D = trunk channels`` for RGB,
    ``trunk channels * C`` otherwise (each channel through the shared trunk).

    ``S`` must be ``k * stride + 2 * context_a`` with ``k = max(kh, kw)`` the window's cells.
    """

    def __init__(
        self,
        trunk: nn.Module,
        spec: BackboneSpec,
        *,
        geometry: PatchGeometry,
        rgb: bool,
        context_a: int,
    ) -> None:
        super().__init__()
        if context_a % spec.stride:
            raise ConfigError(
                f"context must be a multiple of the trunk stride {spec.stride}, got {context_a}"
            )
        self.trunk = trunk
        self.spec = spec
        self.geometry = geometry
        self.rgb = rgb
        self.context_a = context_a
        self.register_buffer("kernel", geometry.kernel(), persistent=False)

    @property
    def window_cells(self) -> int:
        kh, kw = self.geometry.kernel_hw
        return max(kh, kw)

    @property
    def window_a(self) -> int:
        return self.window_cells * self.spec.stride

    @property
    def crop_side_a(self) -> int:
        return self.window_a + 2 * self.context_a

    def feature_dim(self, n_channels: int) -> int:
        return self.spec.out_channels * (1 if self.rgb else n_channels)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x01.shape
        if h != self.crop_side_a or w != self.crop_side_a:
            raise ConfigError(
                f"crops must be {self.crop_side_a}x{self.crop_side_a} analysis px, got {h}x{w}"
            )
        x = trunk_input(x01, self.spec, rgb=self.rgb).contiguous(memory_format=torch.channels_last)
        f = self.trunk(x)
        if not self.rgb:
            f = merge_channel_features(f, n)
        kh, kw = self.geometry.kernel_hw
        k = self.window_cells
        c0 = self.context_a // self.spec.stride
        oy, ox = c0 + (k - kh) // 2, c0 + (k - kw) // 2
        cells = f[:, :, oy : oy + kh, ox : ox + kw].float()
        kernel = self.get_buffer("kernel")
        pooled: torch.Tensor = (cells * kernel).sum(dim=(-2, -1))
        return pooled


class ProjectionHead(nn.Module):
    """The 2-layer MLP of the contrastive stages: (N, D) -> (N, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int = 128, *, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden = hidden_dim or in_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def set_trainable(trunk: nn.Module, *, freeze_early: bool) -> list[nn.Parameter]:
    """Make the trunk trainable except (``freeze_early``) its first blocks; returns the
    trainable parameters. Call :func:`train_mode` before each training pass."""
    params = []
    for name, p in trunk.named_parameters():
        frozen = freeze_early and name.startswith(FROZEN_PREFIXES)
        p.requires_grad_(not frozen)
        if not frozen:
            params.append(p)
    return params


def train_mode(trunk: nn.Module, *, freeze_early: bool) -> None:
    """Training mode for the trainable blocks; frozen blocks stay in eval mode so their
    batch-norm running statistics (pretrained) are neither used per batch nor updated."""
    trunk.train()
    if freeze_early:
        for name, module in trunk.named_children():
            if name.startswith(FROZEN_PREFIXES):
                module.eval()


def freeze(module: nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
