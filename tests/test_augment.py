"""Batched, seeded patch augmentations: shapes, determinism, geometry, stage presets, errors."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.train.augment import AugmentConfig, _rotate, augment_batch

OFF: dict[str, Any] = {
    "hflip": False,
    "vflip": False,
    "rotate_deg": 0.0,
    "brightness": 0.0,
    "contrast": 0.0,
    "solarize_p": 0.0,
    "dropout_p": 0.0,
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=_gen(seed))


def _disc(size: int, radius: float) -> torch.Tensor:
    """A centred bright disc on a dark background, ``(size, size)``."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5 - size / 2
    r = torch.sqrt(coords[:, None] ** 2 + coords[None, :] ** 2)
    return (r <= radius).float() * 0.8 + 0.1


@pytest.mark.parametrize("c", [1, 3, 4])
@pytest.mark.parametrize("config", [AugmentConfig.noisy(), AugmentConfig.clean()])
def test_shape_dtype_range(c: int, config: AugmentConfig) -> None:
    x = _batch(6, c, 24, 20)
    out = augment_batch(x, config, generator=_gen(1), window=16)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.data_ptr() != x.data_ptr()
    x64 = x.double()
    out64 = augment_batch(x64, config, generator=_gen(1))
    assert out64.dtype == torch.float64 and out64.min() >= 0.0 and out64.max() <= 1.0


def test_deterministic_per_seed_and_global_rng_untouched() -> None:
    x = _batch(8, 3, 32, 32)
    state = torch.random.get_rng_state()
    a = augment_batch(x, AugmentConfig.noisy(), generator=_gen(7), window=24)
    b = augment_batch(x, AugmentConfig.noisy(), generator=_gen(7), window=24)
    c = augment_batch(x, AugmentConfig.noisy(), generator=_gen(8), window=24)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # The generator advances: two consecutive batches differ.
    g = _gen(7)
    first = augment_batch(x, AugmentConfig.noisy(), generator=g)
    second = augment_batch(x, AugmentConfig.noisy(), generator=g)
    assert not torch.equal(first, second)


def test_input_not_modified() -> None:
    x = _batch(4, 3, 16, 16)
    before = x.clone()
    augment_batch(x, AugmentConfig.noisy(), generator=_gen(0))
    assert torch.equal(x, before)


def test_identity_when_everything_is_off() -> None:
    x = _batch(5, 3, 18, 22)
    out = augment_batch(x, AugmentConfig(**OFF), generator=_gen(0))
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_flips_only_give_flipped_copies() -> None:
    x = _batch(32, 2, 9, 11)
    h_only = augment_batch(x, AugmentConfig(**{**OFF, "hflip": True}), generator=_gen(3))
    kinds = []
    for i in range(x.shape[0]):
        same, flipped = torch.equal(h_only[i], x[i]), torch.equal(h_only[i], x[i].flip(-1))
        assert same or flipped
        kinds.append(flipped)
    assert 0 < sum(kinds) < len(kinds)  # both outcomes occur with p = 1/2 each

    both = augment_batch(
        x, AugmentConfig(**{**OFF, "hflip": True, "vflip": True}), generator=_gen(4)
    )
    seen = set()
    for i in range(x.shape[0]):
        options = {
            "none": x[i],
            "h": x[i].flip(-1),
            "v": x[i].flip(-2),
            "hv": x[i].flip(-1).flip(-2),
        }
        match = [k for k, v in options.items() if torch.equal(both[i], v)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) == 4


def test_rotate_helper_matches_rot90_and_flip() -> None:
    x = _batch(3, 2, 12, 12)
    quarter = _rotate(x, torch.full((3,), math.pi / 2))
    torch.testing.assert_close(quarter, torch.rot90(x, 1, (-2, -1)), atol=1e-5, rtol=0)
    # Half turn of a non-square crop: rigid in pixel space, about the crop centre.
    y = _batch(2, 1, 10, 16)
    half = _rotate(y, torch.full((2,), math.pi))
    torch.testing.assert_close(half, y.flip(-1, -2), atol=1e-5, rtol=0)
    torch.testing.assert_close(_rotate(y, torch.zeros(2)), y, atol=1e-6, rtol=0)


def test_rotation_keeps_disc_centred() -> None:
    size = 33
    disc = _disc(size, radius=8.0)
    x = disc.expand(16, 3, size, size).clone()
    out = augment_batch(x, AugmentConfig(**{**OFF, "rotate_deg": 90.0}), generator=_gen(5))
    assert not torch.equal(out, x)  # interpolation did happen
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    for i in range(out.shape[0]):
        weight = out[i, 0] - 0.1
        cy = float((weight.sum(1) * coords).sum() / weight.sum())
        cx = float((weight.sum(0) * coords).sum() / weight.sum())
        assert abs(cy - size / 2) < 0.05 and abs(cx - size / 2) < 0.05
        # Bilinear resampling blurs only the rim of the disc.
        assert float((out[i, 0] - disc).abs().mean()) < 0.02


def test_rotation_keeps_window_centred_in_non_square_crop() -> None:
    # A centred bright square (the patch window) in a non-square crop stays centred under
    # arbitrary rotations + flips.
    h, w, win = 40, 56, 16
    x = torch.full((12, 1, h, w), 0.1)
    top, left = (h - win) // 2, (w - win) // 2
    x[..., top : top + win, left : left + win] = 0.9
    cfg = AugmentConfig(**{**OFF, "hflip": True, "vflip": True, "rotate_deg": 180.0})
    out = augment_batch(x, cfg, generator=_gen(6), window=win)
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    for i in range(out.shape[0]):
        weight = out[i, 0] - 0.1
        cy = float((weight.sum(1) * ys).sum() / weight.sum())
        cx = float((weight.sum(0) * xs).sum() / weight.sum())
        assert abs(cy - h / 2) < 0.1 and abs(cx - w / 2) < 0.1


def test_clean_has_no_solarize_or_dropout() -> None:
    clean = AugmentConfig.clean()
    assert clean.solarize_p == 0.0 and clean.dropout_p == 0.0
    noisy = AugmentConfig.noisy()
    assert noisy == AugmentConfig() and noisy.solarize_p > 0 and noisy.dropout_p > 0
    x = torch.full((64, 3, 16, 16), 0.9)
    cfg = AugmentConfig(solarize_p=0.0, dropout_p=0.0, brightness=0.0, contrast=0.0, rotate_deg=0)
    out = augment_batch(x, cfg, generator=_gen(0))
    assert torch.equal(out, x)  # never solarized (0.1) nor holed
    # With the clean preset itself on a constant image the values stay near 0.9 (no 0.1 pixels).
    out = augment_batch(x, clean, generator=_gen(1))
    assert out.min() > 0.5


def test_solarize_only() -> None:
    x = torch.full((64, 1, 8, 8), 0.9)
    x[..., :4] = 0.2  # below the threshold: never changes
    out = augment_batch(x, AugmentConfig(**{**OFF, "solarize_p": 0.5}), generator=_gen(2))
    assert torch.equal(out[..., :4], x[..., :4])
    high = out[..., 4:].flatten(1)
    solarized = torch.isclose(high, torch.tensor(0.1)).all(1)
    kept = (high == 0.9).all(1)
    assert bool((solarized | kept).all()) and 0 < int(solarized.sum()) < 64


def test_dropout_holes_inside_central_window() -> None:
    n, c, h, w, win = 48, 3, 40, 50, 20
    x = torch.zeros(n, c, h, w)
    x[:, :, ::2] = 1.0  # per-channel mean 0.5 (stripes), a value no pixel has
    cfg = AugmentConfig(**{**OFF, "dropout_p": 1.0, "dropout_holes": 3, "dropout_size": 0.25})
    out = augment_batch(x, cfg, generator=_gen(9), window=win)
    holes = out == 0.5  # (N, C, H, W)
    assert torch.equal(holes, holes[:, :1].expand_as(holes))  # same holes in every channel
    top, left = (h - win) // 2, (w - win) // 2
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[top : top + win, left : left + win] = True
    assert not bool((holes[:, 0] & ~inside).any())
    side = round(0.25 * win)
    for i in range(n):
        area = int(holes[i, 0].sum())
        assert side * side <= area <= 3 * side * side
    assert torch.equal(out[~holes], x[~holes])
    # Default window = min(H, W): holes stay inside the centred square.
    out = augment_batch(x, cfg, generator=_gen(10))
    holes = out[:, 0] == 0.5
    lo = (w - h) // 2
    assert not bool(holes[:, :, :lo].any()) and not bool(holes[:, :, lo + h :].any())
    # dropout_p = 0.5: some samples keep every pixel.
    half = augment_batch(
        x, AugmentConfig(**{**OFF, "dropout_p": 0.5}), generator=_gen(11), window=win
    )
    untouched = (half == x).flatten(1).all(1)
    assert 0 < int(untouched.sum()) < n


def test_brightness_contrast_are_per_sample() -> None:
    x = _batch(16, 3, 8, 8) * 0.5 + 0.25
    bright = augment_batch(x, AugmentConfig(**{**OFF, "brightness": 0.2}), generator=_gen(12))
    ratio = bright / x
    per_sample = ratio.flatten(1)
    torch.testing.assert_close(per_sample, per_sample[:, :1].expand_as(per_sample))
    assert per_sample.min() >= 0.8 - 1e-6 and per_sample.max() <= 1.2 + 1e-6
    contrast = augment_batch(x, AugmentConfig(**{**OFF, "contrast": 0.2}), generator=_gen(13))
    mean = x.mean(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(contrast.mean(dim=(-2, -1), keepdim=True), mean)
    far = (x - mean).abs() > 0.05
    factor = ((contrast - mean) / (x - mean))[far]
    assert factor.min() >= 0.8 - 1e-3 and factor.max() <= 1.2 + 1e-3


def test_disabled_option_does_not_shift_other_draws() -> None:
    # Every parameter is drawn whatever the config: enabling hflip leaves the brightness factors
    # unchanged, so each sample is the brightness-only output, flipped or not.
    x = _batch(16, 3, 16, 16)
    a = augment_batch(x, AugmentConfig(**{**OFF, "brightness": 0.3}), generator=_gen(14))
    b = augment_batch(
        x, AugmentConfig(**{**OFF, "brightness": 0.3, "hflip": True}), generator=_gen(14)
    )
    for i in range(x.shape[0]):
        assert torch.equal(b[i], a[i]) or torch.equal(b[i], a[i].flip(-1))
    assert not torch.equal(a, b)


def test_config_roundtrip() -> None:
    cfg = AugmentConfig(rotate_deg=90, brightness=0.1, dropout_holes=2)
    assert isinstance(cfg.rotate_deg, float)
    d = cfg.to_dict()
    assert d["rotate_deg"] == 90.0 and d["dropout_holes"] == 2
    assert AugmentConfig.from_dict(d) == cfg
    assert AugmentConfig.from_dict({}) == AugmentConfig()
    with pytest.raises(ConfigError, match="unknown"):
        AugmentConfig.from_dict({"rotate": 3})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hflip", 1),
        ("vflip", "yes"),
        ("rotate_deg", -1.0),
        ("rotate_deg", 181.0),
        ("rotate_deg", float("nan")),
        ("brightness", -0.1),
        ("brightness", 1.5),
        ("contrast", 2.0),
        ("solarize_p", 1.1),
        ("solarize_threshold", -0.5),
        ("dropout_p", -0.01),
        ("dropout_holes", 0),
        ("dropout_holes", 2.0),
        ("dropout_holes", True),
        ("dropout_size", 0.0),
        ("dropout_size", 1.01),
        ("brightness", "0.2"),
        ("contrast", True),
    ],
)
def test_config_errors_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        AugmentConfig(**{field: value})


def test_augment_batch_errors() -> None:
    x = _batch(2, 3, 8, 8)
    cfg = AugmentConfig()
    with pytest.raises(ConfigError, match="window"):
        augment_batch(x, cfg, generator=_gen(0), window=9)
    with pytest.raises(ConfigError, match="window"):
        augment_batch(x, cfg, generator=_gen(0), window=0)
    with pytest.raises(ConfigError):
        augment_batch(x[0], cfg, generator=_gen(0))  # 3-D
    with pytest.raises(ConfigError):
        augment_batch((x * 255).to(torch.uint8), cfg, generator=_gen(0))
    with pytest.raises(ConfigError):
        augment_batch(x, {"hflip": True}, generator=_gen(0))  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    x = _batch(8, 3, 32, 32)
    cpu = augment_batch(x, AugmentConfig.noisy(), generator=_gen(21), window=24)
    gpu = augment_batch(x.cuda(), AugmentConfig.noisy(), generator=_gen(21), window=24)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
