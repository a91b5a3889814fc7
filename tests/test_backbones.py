"""Backbone registry and weight resolution (no network: every path is local or refused fast)."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.features.backbones import (
    WeightsUnavailableError,
    available_backbones,
    build_trunk,
    get_backbone_spec,
    resolve_auto_weights,
)


def _conv1(trunk: torch.nn.Module) -> torch.Tensor:
    """The first convolution's weight of a ResNet trunk."""
    conv = trunk.get_submodule("conv1")
    assert isinstance(conv, torch.nn.Conv2d)
    return conv.weight


def test_registry_states_the_contract() -> None:
    spec = get_backbone_spec("resnet18-l3")
    assert (spec.stride, spec.out_channels, spec.receptive_field) == (16, 256, 211)
    assert spec.halo % spec.stride == 0 and spec.halo >= spec.receptive_field / 2
    assert "resnet18-l3" in available_backbones()
    with pytest.raises(ConfigError, match="unknown backbone 'vit'"):
        get_backbone_spec("vit")


def test_trunk_output_stride_and_channels() -> None:
    trunk, spec, _ = build_trunk(weights="random", seed=0)
    with torch.inference_mode():
        out = trunk(torch.zeros(1, 3, 96, 160))
    assert out.shape == (1, spec.out_channels, 96 // 16, 160 // 16)


def test_random_weights_are_seeded_and_leave_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, _, info_a = build_trunk(weights="random", seed=1)
    b, _, _ = build_trunk(weights="random", seed=1)
    c, _, info_c = build_trunk(weights="random", seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (_conv1(m) for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert info_a.identity != info_c.identity


def test_local_weights_file_torchvision_layout(tmp_path: Path) -> None:
    """A full torchvision ResNet-18 state dict (with layer4 and fc) loads into the trunk."""
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    trunk, _, info = build_trunk(weights=path)
    assert torch.equal(_conv1(trunk), net.conv1.weight)
    assert info.kind == "file" and info.identity.startswith("file:")


def test_bad_weights_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="weights file not found"):
        build_trunk(weights=tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match=r"junk\.pth: not a PyTorch weights file"):
        build_trunk(weights=junk)
    partial = tmp_path / "partial.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, partial)
    with pytest.raises(WeightsUnavailableError, match=r"partial\.pth: 89 trunk parameters missing"):
        build_trunk(weights=partial)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(WeightsUnavailableError, match=r"list\.pth: holds a list, not a state"):
        build_trunk(weights=listed)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (lambda: {"args": argparse.Namespace(lr=0.1)}, "pickles the Python object argparse"),
        (lambda: {"x": np.zeros(3)}, "pickles the Python object numpy"),
    ],
    ids=["namespace", "numpy"],
)
def test_weights_file_of_python_objects_is_one_line(
    tmp_path: Path, content: Any, reason: str
) -> None:
    """Issue 31: a checkpoint torch can only load with weights_only=False gave torch's 4-line
    advice (which suggests loading untrusted pickles); now one line naming the file."""
    path = tmp_path / "checkpoint.pth"
    torch.save(content(), path)
    with pytest.raises(WeightsUnavailableError) as info:
        build_trunk(weights=path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a PyTorch weights file") and reason in message
    assert "\n" not in message and "weights_only" not in message and "--weights" in message


def test_imagenet_offline_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(
        WeightsUnavailableError,
        match=r"resnet18-f37072fd\.pth not found in .*"
        r"checkpoints; copy the file there",
    ):
        build_trunk(weights="imagenet", cache_dir=tmp_path, allow_download=False)


def test_imagenet_checksum_is_verified(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints" / "resnet18-f37072fd.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"tampered")
    with pytest.raises(WeightsUnavailableError, match="does not match the published"):
        build_trunk(weights="imagenet", cache_dir=tmp_path)


def _unreachable_imagenet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Publish the ImageNet file at a loopback port that refuses connections (port 9)."""
    from simsearch_wsi.features import backbones

    spec = get_backbone_spec("resnet18-l3")
    assert spec.imagenet is not None
    bad = backbones.PublishedWeights(
        "http://127.0.0.1:9/resnet18.pth", spec.imagenet.filename, spec.imagenet.sha256
    )
    monkeypatch.setitem(
        backbones._REGISTRY,
        "resnet18-l3",
        backbones.BackboneSpec(**{**spec.__dict__, "imagenet": bad}),
    )


def test_download_failure_is_fast_and_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreachable host fails with advice instead of hanging (port 9 on loopback refuses)."""

    _unreachable_imagenet(monkeypatch)
    with pytest.raises(WeightsUnavailableError, match=r"could not be downloaded.*pass --weights"):
        build_trunk(
            weights="imagenet", cache_dir=tmp_path, allow_download=True, download_timeout_s=5
        )
    assert not any(tmp_path.rglob("*.part"))  # nothing half-written


def test_verified_imagenet_file_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache path and checksum logic, with a stand-in file whose hash we publish."""
    import torchvision

    from simsearch_wsi.features import backbones

    net = torchvision.models.resnet18(weights=None)
    ckpt = tmp_path / "checkpoints" / "stand-in.pth"
    ckpt.parent.mkdir()
    torch.save(net.state_dict(), ckpt)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    spec = get_backbone_spec("resnet18-l3")
    pub = backbones.PublishedWeights("http://127.0.0.1:9/x.pth", "stand-in.pth", digest)
    monkeypatch.setitem(
        backbones._REGISTRY,
        "resnet18-l3",
        backbones.BackboneSpec(**{**spec.__dict__, "imagenet": pub}),
    )
    trunk, _, info = build_trunk(weights="imagenet", cache_dir=tmp_path)
    assert info.kind == "imagenet" and torch.equal(_conv1(trunk), net.conv1.weight)


# --- the embedded trunk and the `auto` order (issue 9) -------------------------------------------
def test_embedded_trunk_ships_with_provenance() -> None:
    """The package carries fp16 trunk weights with the command, seed, data hashes and licences
    that made them; they load into the trunk as float32 and give non-degenerate features."""
    from simsearch_wsi.features.backbones import embedded_weights_path

    spec = get_backbone_spec("resnet18-l3")
    path = embedded_weights_path(spec)
    assert path.is_file() and path.stat().st_size < 8_000_000
    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert all(
        v.dtype == torch.float16 for v in obj["state_dict"].values() if v.is_floating_point()
    )
    meta = json.loads(obj["simsearch_wsi"])
    assert meta["command"].startswith("simsearch-wsi pretrain ") and "--seed" in meta["command"]
    assert meta["base_weights"]["kind"] == "random" and meta["objective"] in ("simclr", "masked")
    assert meta["data"] and all(d["sha256"] and d["licence"] for d in meta["data"])
    trunk, _, info = build_trunk(weights="embedded")
    assert info.kind == "embedded" and info.identity.startswith("embedded:")
    assert _conv1(trunk).dtype == torch.float32
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = trunk(x).mean(dim=(2, 3))
    assert torch.isfinite(f).all() and float(f.std()) > 0


def test_missing_embedded_file_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    from simsearch_wsi.features import backbones

    spec = get_backbone_spec("resnet18-l3")
    monkeypatch.setitem(
        backbones._REGISTRY,
        "resnet18-l3",
        backbones.BackboneSpec(**{**spec.__dict__, "embedded": "absent.pt"}),
    )
    with pytest.raises(WeightsUnavailableError, match=r"absent\.pt are missing.*reinstall"):
        build_trunk(weights="embedded")


def test_auto_prefers_cached_imagenet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    from simsearch_wsi.features import backbones

    ckpt = tmp_path / "checkpoints" / "stand-in.pth"
    ckpt.parent.mkdir()
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), ckpt)
    spec = get_backbone_spec("resnet18-l3")
    pub = backbones.PublishedWeights(
        "http://127.0.0.1:9/x.pth", "stand-in.pth", hashlib.sha256(ckpt.read_bytes()).hexdigest()
    )
    monkeypatch.setitem(
        backbones._REGISTRY,
        "resnet18-l3",
        backbones.BackboneSpec(**{**spec.__dict__, "imagenet": pub}),
    )
    _, _, info, notice = resolve_auto_weights(cache_dir=tmp_path, allow_download=True)
    assert info.kind == "imagenet" and notice is None


def test_auto_falls_back_to_the_embedded_trunk_with_one_line_notice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    _, _, info, notice = resolve_auto_weights(cache_dir=tmp_path, allow_download=False)
    assert info.kind == "embedded" and notice is not None and "\n" not in notice
    assert "embedded trunk" in notice and "are not cached" in notice
    assert "resnet18-f37072fd.pth" in notice and str(tmp_path / "checkpoints") in notice
    # online but the download fails (port 9 refuses): still the embedded trunk, reason given
    _unreachable_imagenet(monkeypatch)
    _, _, info, notice = resolve_auto_weights(
        cache_dir=tmp_path, allow_download=True, download_timeout_s=5
    )
    assert info.kind == "embedded" and notice is not None and "could not be downloaded" in notice


def test_cli_auto_weights_notice(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    synthetic_slide: Any,
) -> None:
    """`embed` without --weights, offline and with an empty torch cache, uses the embedded
    trunk and says so in one line on stderr."""
    from simsearch_wsi.cli.main import main

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    args = ["embed", str(synthetic_slide.path), "--cache", str(tmp_path / "c")]
    assert main([*args, "--patch-size-px", "96"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(err) == 1 and "embedded trunk" in err[0] and "--weights imagenet" in err[0]
