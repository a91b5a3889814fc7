"""Domain pretraining (issue 5): SimCLR on random foreground patches gives loadable weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from simsearch_wsi.backbones import WeightsUnavailableError, build_trunk
from simsearch_wsi.cli import main
from simsearch_wsi.io import open_image
from simsearch_wsi.preprocess import fit_normalization
from simsearch_wsi.pretrain import (
    PRETRAIN_FORMAT,
    PretrainConfig,
    foreground_centers,
    pretrain_trunk,
    save_pretrained,
)
from simsearch_wsi.tissue import detect_foreground
from simsearch_wsi.train import StageConfig

TINY = PretrainConfig(
    patches_per_image=24, stage=StageConfig(2, 16, 1e-3, temperature=0.5, max_steps_per_epoch=2)
)


def test_foreground_centers_lie_on_tissue(small_slides: Any) -> None:
    slide = small_slides[0]
    with open_image(slide.path) as image:
        mask = detect_foreground(image)
        pts = foreground_centers(image, 200, np.random.default_rng(0))
    assert len(pts) == 200
    on_tissue = [slide.tissue_mask[int(y), int(x)] for x, y in pts]
    assert np.mean(on_tissue) > 0.9
    assert mask.area_fraction < 0.9  # the slide has glass, so this says something


def test_pretrain_changes_the_trunk_and_the_weights_load_back(
    tmp_path: Path, small_slides: Any
) -> None:
    paths = [str(s.path) for s in small_slides[:2]]
    trunk, spec, info = build_trunk("resnet18-l3", "random", seed=0)
    start = {k: v.clone() for k, v in trunk.state_dict().items()}
    with open_image(paths[0]) as image:
        norm = fit_normalization([image])
    result = pretrain_trunk(
        paths,
        trunk=trunk,
        spec=spec,
        weights=info,
        normalization=norm,
        channels=("R", "G", "B"),
        rgb=True,
        patch_size_l0=48,
        open_image=lambda p: open_image(p),
        config=TINY,
        seed=0,
    )
    assert all(torch.equal(start[k], v) for k, v in trunk.state_dict().items())  # input untouched
    assert result.metrics["patches"] == 48 and result.metrics["stage"]["epochs"] == 2
    assert not torch.equal(result.state_dict["conv1.weight"], start["conv1.weight"])  # random:
    assert any("every layer" in n for n in result.notes)  # nothing frozen
    out = save_pretrained(tmp_path / "trunk.pth", result, backbone=spec.name, base_weights=info)
    loaded, _, loaded_info = build_trunk("resnet18-l3", out)
    assert loaded_info.kind == "file"
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(loaded(x), trunk(x))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, result.state_dict[k])
    meta = json.loads(torch.load(out, weights_only=True)["simsearch_wsi"])
    assert meta["format"] == PRETRAIN_FORMAT and meta["backbone"] == "resnet18-l3"


def test_pretrain_cli_writes_weights_usable_with_weights_path(
    tmp_path: Path, small_slides: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cohort.pth"
    args = ["pretrain", str(small_slides[0].path), "--out", str(out), "--weights", "random"]
    args += ["--patches-per-image", "16", "--epochs", "1", "--cache", str(tmp_path / "c")]
    assert main(args) == 0
    assert "--weights" in capsys.readouterr().out
    _, _, info = build_trunk("resnet18-l3", out)
    assert info.kind == "file"
    assert main(["info", str(small_slides[0].path)]) == 0
    embed = ["embed", str(small_slides[0].path), "--weights", str(out)]
    assert main([*embed, "--cache", str(tmp_path / "c")]) == 0


def test_pretrain_cli_errors_are_one_line(
    tmp_path: Path, small_slides: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "w.pth")
    code = main(["pretrain", str(tmp_path / "missing.tiff"), "--out", out, "--weights", "random"])
    err = capsys.readouterr().err
    assert code == 1 and "missing.tiff" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w.pth").exists()
    code = main(["pretrain", str(small_slides[0].path), "--out", str(tmp_path)])
    assert code == 1 and "is a folder" in capsys.readouterr().err


def test_corrupt_pretrained_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="not a readable"):
        build_trunk("resnet18-l3", bad)
