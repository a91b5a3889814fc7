"""Backbone registry and weight resolution (no network: every path is local or refused fast)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from simsearch_wsi.backbones import (
    WeightsUnavailableError,
    available_backbones,
    build_trunk,
    get_backbone_spec,
)
from simsearch_wsi.errors import ConfigError


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
    wa, wb, wc = (m.conv1.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert info_a.identity != info_c.identity


def test_local_weights_file_torchvision_layout(tmp_path: Path) -> None:
    """A full torchvision ResNet-18 state dict (with layer4 and fc) loads into the trunk."""
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    trunk, _, info = build_trunk(weights=path)
    assert torch.equal(trunk.conv1.weight, net.conv1.weight)
    assert info.kind == "file" and info.identity.startswith("file:")


def test_bad_weights_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError, match="weights file not found"):
        build_trunk(weights=tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="not a readable PyTorch weights file"):
        build_trunk(weights=junk)
    partial = tmp_path / "partial.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, partial)
    with pytest.raises(WeightsUnavailableError, match="trunk parameters missing"):
        build_trunk(weights=partial)


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


def test_download_failure_is_fast_and_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreachable host fails with advice instead of hanging (port 9 on loopback refuses)."""
    from simsearch_wsi import backbones

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
    with pytest.raises(WeightsUnavailableError, match=r"could not be downloaded.*pass --weights"):
        build_trunk(
            weights="imagenet", cache_dir=tmp_path, allow_download=True, download_timeout_s=5
        )
    assert not any(tmp_path.rglob("*.part"))  # nothing half-written


def test_verified_imagenet_file_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache path and checksum logic, with a stand-in file whose hash we publish."""
    import torchvision

    from simsearch_wsi import backbones

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
    assert info.kind == "imagenet" and torch.equal(trunk.conv1.weight, net.conv1.weight)
