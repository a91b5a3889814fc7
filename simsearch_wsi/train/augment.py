"""Batched, seeded patch augmentations for contrastive training (SimSearch paper, section 2).

A training sample is a *context crop*: a patch window of side ``window`` pixels centred in a
larger crop, so that rotating the crop does not bring padding into the window. Every geometric
transform turns or flips about the crop centre, hence the window stays centred and a caller can cut
it out afterwards with ``x[..., top:top + window, left:left + window]``,
``top = (H - window) // 2``, ``left = (W - window) // 2``.

The transforms, applied in this order to each sample independently:

1. horizontal flip (probability 1/2) and vertical flip (probability 1/2);
2. rotation by an angle uniform in ``[-rotate_deg, rotate_deg]`` (bilinear, reflection padding);
3. brightness: ``x * b`` with ``b`` uniform in ``[1 - brightness, 1 + brightness]``;
4. contrast: ``(x - m) * c + m`` with ``c`` uniform in ``[1 - contrast, 1 + contrast]`` and ``m``
   the sample's per-channel mean; the result is clipped to ``[0, 1]``;
5. solarize (probability ``solarize_p``): pixels ``>= solarize_threshold`` become ``1 - x``;
6. coarse dropout (probability ``dropout_p``): ``dropout_holes`` square holes of side
   ``max(1, round(dropout_size * window))`` px, placed inside the central window and filled with
   the sample's per-channel mean.

The paper's noisy (SimCLR) stage uses all of them (:meth:`AugmentConfig.noisy`); the clean
(supervised contrastive) stage drops solarize and coarse dropout (:meth:`AugmentConfig.clean`).

Randomness. Every random parameter is drawn on the CPU from the caller's ``torch.Generator``, in a
fixed order and in full whatever the configuration (a disabled transform still consumes its
draws), then moved to the tensor's device: the same seed gives the same output on any device, and
the global torch RNG is neither used nor advanced. All work is vectorised over the batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from simsearch_wsi.core.errors import ConfigError

__all__ = ["AugmentConfig", "augment_batch"]


def _check_range(name: str, value: object, low: float, high: float, *, low_open: bool) -> float:
    """``value`` as a float, or a :class:`ConfigError` naming ``name`` and the valid range."""
    bracket = "(" if low_open else "["
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(
            f"AugmentConfig.{name} must be a number in {bracket}{low}, {high}], "
            f"got {value!r} ({type(value).__name__})"
        )
    v = float(value)
    below = v <= low if low_open else v < low
    if not math.isfinite(v) or below or v > high:
        raise ConfigError(f"AugmentConfig.{name} must be in {bracket}{low}, {high}], got {v!r}")
    return v


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of :func:`augment_batch`.

    Attributes
    ----------
    hflip, vflip
        Flip each sample left-right / up-down with probability 1/2.
    rotate_deg
        Rotation angle uniform in ``[-rotate_deg, rotate_deg]`` degrees, in ``[0, 180]``;
        0 disables rotation.
    brightness
        Multiplicative factor uniform in ``[1 - brightness, 1 + brightness]``, in ``[0, 1]``.
    contrast
        Contrast factor uniform in ``[1 - contrast, 1 + contrast]`` around the per-sample
        per-channel mean, in ``[0, 1]``.
    solarize_p
        Probability per sample of solarization, in ``[0, 1]``.
    solarize_threshold
        Pixels ``>= solarize_threshold`` are inverted (``1 - x``) when solarizing, in ``[0, 1]``.
    dropout_p
        Probability per sample of coarse dropout, in ``[0, 1]``.
    dropout_holes
        Number of holes per dropped-out sample, ``>= 1``.
    dropout_size
        Hole side as a fraction of the patch window side, in ``(0, 1]``.
    """

    hflip: bool = True
    vflip: bool = True
    rotate_deg: float = 180.0
    brightness: float = 0.2
    contrast: float = 0.2
    solarize_p: float = 0.2
    solarize_threshold: float = 0.5
    dropout_p: float = 0.5
    dropout_holes: int = 4
    dropout_size: float = 0.15

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(
                    f"AugmentConfig.{name} must be a bool (True or False), got {value!r}"
                )
        ranges: dict[str, tuple[float, float, bool]] = {
            "rotate_deg": (0.0, 180.0, False),
            "brightness": (0.0, 1.0, False),
            "contrast": (0.0, 1.0, False),
            "solarize_p": (0.0, 1.0, False),
            "solarize_threshold": (0.0, 1.0, False),
            "dropout_p": (0.0, 1.0, False),
            "dropout_size": (0.0, 1.0, True),
        }
        for name, (low, high, low_open) in ranges.items():
            v = _check_range(name, getattr(self, name), low, high, low_open=low_open)
            object.__setattr__(self, name, v)
        holes = self.dropout_holes
        if isinstance(holes, bool) or not isinstance(holes, int) or holes < 1:
            raise ConfigError(f"AugmentConfig.dropout_holes must be an integer >= 1, got {holes!r}")

    @classmethod
    def noisy(cls) -> AugmentConfig:
        """The self-supervised (SimCLR) stage: every augmentation, with the defaults."""
        return cls()

    @classmethod
    def clean(cls) -> AugmentConfig:
        """The supervised contrastive stage: the defaults without solarize and coarse dropout."""
        return cls(solarize_p=0.0, dropout_p=0.0)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        """A config from :meth:`to_dict`'s output; missing fields take their defaults.

        Raises
        ------
        ConfigError
            On an unknown field or an invalid value.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"AugmentConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown AugmentConfig field(s) {unknown}; valid fields are {sorted(known)}"
            )
        return cls(**data)


@dataclass(frozen=True)
class _Params:
    """The random parameters of one batch, drawn on the CPU (leading dimension N)."""

    hflip: torch.Tensor  # (N,) bool
    vflip: torch.Tensor  # (N,) bool
    angle: torch.Tensor  # (N,) float64, radians
    brightness: torch.Tensor  # (N,) float64
    contrast: torch.Tensor  # (N,) float64
    solarize: torch.Tensor  # (N,) bool
    dropout: torch.Tensor  # (N,) bool
    hole_yx: torch.Tensor  # (N, K, 2) float64 in [0, 1), relative hole positions


def _draw(n: int, config: AugmentConfig, generator: torch.Generator) -> _Params:
    """Draw every random parameter of a batch of ``n`` samples, always in the same order."""

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, dtype=torch.float64)

    def symmetric(amplitude: float) -> torch.Tensor:
        return 1.0 + amplitude * (2.0 * uniform(n) - 1.0)

    hflip = uniform(n) < 0.5
    vflip = uniform(n) < 0.5
    angle = math.radians(config.rotate_deg) * (2.0 * uniform(n) - 1.0)
    brightness = symmetric(config.brightness)
    contrast = symmetric(config.contrast)
    solarize = uniform(n) < config.solarize_p
    dropout = uniform(n) < config.dropout_p
    hole_yx = uniform(n, config.dropout_holes, 2)
    return _Params(hflip, vflip, angle, brightness, contrast, solarize, dropout, hole_yx)


def _rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate each sample about the crop centre (bilinear, reflection padding).

    Parameters
    ----------
    x
        ``(N, C, H, W)`` floating tensor.
    angle
        ``(N,)`` angles in radians (any device, any float dtype); positive turns the image
        counter-clockwise as displayed (row 0 at the top), like
        ``torch.rot90(x, 1, (-2, -1))`` for a quarter turn.

    Returns
    -------
    torch.Tensor
        ``(N, C, H, W)``, same dtype and device as ``x``.
    """
    n, _, h, w = x.shape
    a = angle.to(device=x.device, dtype=torch.float64)
    cos, sin = torch.cos(a), torch.sin(a)
    # The grid maps each output pixel to its source location in normalised coordinates, where
    # x spans W pixels and y spans H pixels over [-1, 1]; the aspect ratio keeps the rotation
    # rigid in pixel space for non-square crops.
    theta = torch.zeros(n, 2, 3, dtype=torch.float64, device=x.device)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * (h / w)
    theta[:, 1, 0] = sin * (w / h)
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta.to(x.dtype), [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _dropout_mask(
    params: _Params, h: int, w: int, window: int, hole: int, device: torch.device
) -> torch.Tensor:
    """``(N, H, W)`` bool mask of the dropout holes (all False for samples without dropout)."""
    top, left = (h - window) // 2, (w - window) // 2
    span = window - hole + 1  # admissible top-left offsets inside the window
    offsets = torch.clamp((params.hole_yx * span).floor().long(), max=span - 1)  # (N, K, 2)
    offsets = offsets.to(device)
    y0 = offsets[..., 0:1] + top  # (N, K, 1)
    x0 = offsets[..., 1:2] + left
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_rows = (rows >= y0) & (rows < y0 + hole)  # (N, K, H)
    in_cols = (cols >= x0) & (cols < x0 + hole)  # (N, K, W)
    mask = (in_rows[..., :, None] & in_cols[..., None, :]).any(dim=1)  # (N, H, W)
    return mask & params.dropout.to(device)[:, None, None]


def augment_batch(
    x: torch.Tensor,
    config: AugmentConfig,
    *,
    generator: torch.Generator,
    window: int | None = None,
) -> torch.Tensor:
    """Augment a batch of context crops, each sample with its own random parameters.

    Parameters
    ----------
    x
        ``(N, C, H, W)`` floating tensor with values in ``[0, 1]``; any ``C >= 1``, any device.
    config
        Which augmentations and how strong (see :class:`AugmentConfig`).
    generator
        A CPU ``torch.Generator``; every random parameter is drawn from it (and only from it).
    window
        Side in pixels of the patch window centred in each crop, ``1 <= window <= min(H, W)``;
        dropout holes are placed inside it and sized relative to it. Default ``min(H, W)``.

    Returns
    -------
    torch.Tensor
        A new ``(N, C, H, W)`` tensor, same dtype and device as ``x``, values in ``[0, 1]``.
        With every transform disabled it equals ``x`` exactly.

    Raises
    ------
    ConfigError
        On a tensor that is not 4-D floating, a non-CPU generator or an invalid ``window``.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        desc = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(f"augment_batch expects an (N, C, H, W) floating tensor, got {desc}")
    if not isinstance(config, AugmentConfig):
        raise ConfigError(f"augment_batch expects an AugmentConfig, got {type(config).__name__}")
    if generator.device.type != "cpu":
        raise ConfigError(
            f"augment_batch needs a CPU torch.Generator (got one on {generator.device}); "
            "parameters are drawn on the CPU and moved to the tensor's device"
        )
    n, c, h, w = x.shape
    if c < 1 or h < 1 or w < 1:
        raise ConfigError(f"augment_batch got an empty image dimension: shape {tuple(x.shape)}")
    if window is None:
        window = min(h, w)
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= min(h, w):
        raise ConfigError(
            f"window must be an integer in [1, min(H, W)] = [1, {min(h, w)}], got {window!r}"
        )

    p = _draw(n, config, generator)
    dev, dt = x.device, x.dtype

    def per_sample(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=dev)[:, None, None, None]

    out = x
    if config.hflip:
        out = torch.where(per_sample(p.hflip), out.flip(-1), out)
    if config.vflip:
        out = torch.where(per_sample(p.vflip), out.flip(-2), out)
    if config.rotate_deg > 0:
        out = _rotate(out, p.angle)
    if config.brightness > 0:
        out = out * per_sample(p.brightness.to(dt))
    if config.contrast > 0:
        mean = out.mean(dim=(-2, -1), keepdim=True)
        out = (out - mean) * per_sample(p.contrast.to(dt)) + mean
    out = out.clamp(0.0, 1.0)
    if config.solarize_p > 0:
        flip = per_sample(p.solarize) & (out >= config.solarize_threshold)
        out = torch.where(flip, 1.0 - out, out)
    if config.dropout_p > 0:
        hole = min(window, max(1, round(config.dropout_size * window)))
        mask = _dropout_mask(p, h, w, window, hole, dev)[:, None]  # (N, 1, H, W)
        mean = out.mean(dim=(-2, -1), keepdim=True)  # (N, C, 1, 1)
        out = torch.where(mask, mean, out)
    if out is x:
        out = x.clone()
    return out
