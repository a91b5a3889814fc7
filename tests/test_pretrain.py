"""Domain pretraining (issue 5): SimCLR on random foreground patches gives loadable weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from simsearch_wsi.cli.main import main
from simsearch_wsi.features.backbones import (
    WeightsInfo,
    WeightsUnavailableError,
    build_trunk,
    get_backbone_spec,
)
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.features.preprocess import fit_normalization
from simsearch_wsi.features.tissue import detect_foreground
from simsearch_wsi.io import open_image
from simsearch_wsi.train.fit import StageConfig
from simsearch_wsi.train.pretrain import (
    PRETRAIN_FORMAT,
    PretrainConfig,
    foreground_centers,
    pretrain_trunk,
    save_pretrained,
)

TINY = PretrainConfig(
    patches_per_image=24,
    objective="simclr",
    stage=StageConfig(2, 16, 1e-3, temperature=0.5, max_steps_per_epoch=2),
)


def _pretrain(small_slides: Any, trunk: torch.nn.Module, config: PretrainConfig) -> Any:
    """Pretrain a random-weight ``trunk`` on the first two small slides (RGB, 48 px)."""
    paths = [str(s.path) for s in small_slides[:2]]
    spec = get_backbone_spec("resnet18-l3")
    with open_image(paths[0]) as image:
        norm = fit_normalization([image])
    weights = WeightsInfo("random", "random:seed0", "seeded random")
    return pretrain_trunk(
        paths,
        FeatureExtractor(trunk, spec, weights, autocast=False),
        normalization=norm,
        channels=("R", "G", "B"),
        rgb=True,
        patch_size_l0=48,
        open_image=lambda p: open_image(p),
        config=config,
        seed=0,
    )


def test_foreground_centers_lie_on_tissue(small_slides: Any) -> None:
    slide = small_slides[0]
    with open_image(slide.path) as image:
        mask = detect_foreground(image)
        pts = foreground_centers(image, 200, rng=np.random.default_rng(0))
    assert len(pts) == 200
    on_tissue = [slide.tissue_mask[int(y), int(x)] for x, y in pts]
    assert np.mean(on_tissue) > 0.9
    assert mask.area_fraction < 0.9  # the slide has glass, so this says something


def test_pretrain_changes_the_trunk_and_the_weights_load_back(
    tmp_path: Path, small_slides: Any
) -> None:
    trunk, spec, info = build_trunk("resnet18-l3", "random", seed=0)
    start = {k: v.clone() for k, v in trunk.state_dict().items()}
    result = _pretrain(small_slides, trunk, TINY)
    assert all(torch.equal(start[k], v) for k, v in trunk.state_dict().items())  # input untouched
    assert result.metrics["patches"] == 48 and result.metrics["stage"]["epochs"] == 2
    assert not torch.equal(result.state_dict["conv1.weight"], start["conv1.weight"])  # random:
    assert any("every layer" in n for n in result.notes)  # nothing frozen
    base = FeatureExtractor(trunk, spec, info, autocast=False)
    out = save_pretrained(tmp_path / "trunk.pth", result, base=base)
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
    with pytest.raises(WeightsUnavailableError, match="not a PyTorch weights file"):
        build_trunk("resnet18-l3", bad)


def test_masked_objective_pieces() -> None:
    """Masks blank exactly the asked share of cells; targets are the cells' own pixels,
    standardised per cell; the loss only looks at blanked cells."""
    from simsearch_wsi.train.masked import PixelDecoder, cell_targets, cells_of, random_cell_mask

    gen = torch.Generator().manual_seed(0)
    mask = random_cell_mask(5, 4, 6, ratio=0.5, generator=gen)
    assert mask.shape == (5, 4, 6) and (mask.sum(dim=(1, 2)) == 12).all()
    assert not torch.equal(mask[0], mask[1])  # each sample its own cells
    with pytest.raises(Exception, match="mask ratio"):
        random_cell_mask(1, 2, 2, ratio=1.0, generator=gen)
    x = torch.rand(2, 3, 32, 48, generator=gen)
    cells = cells_of(x, 16)
    assert cells.shape == (2, 2, 3, 3 * 256)
    torch.testing.assert_close(cells[1, 1, 2].view(3, 16, 16), x[1, :, 16:32, 32:48])
    t = cell_targets(x, 16)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 2, 3), atol=1e-5, rtol=0)
    dec = PixelDecoder(256, 16)
    assert dec(torch.zeros(1, 256, 2, 3)).shape == (1, 3, 32, 48)


def test_masked_loss_only_sees_blanked_cells() -> None:
    """A "trunk" that passes each cell's pixels on as its feature vector, and a decoder that
    puts them back, reconstruct visible cells exactly (inputs already standardised per cell)
    and blanked cells as zeros: the loss is 1 (the blanked cells' mean square), where counting
    visible cells too would give the mask ratio."""
    from torch.nn.functional import pixel_shuffle, pixel_unshuffle

    from simsearch_wsi.train.masked import PixelDecoder, cell_targets, masked_loss

    class Cells(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return pixel_unshuffle(x, 16)

    class Identity(PixelDecoder):
        def forward(self, f: torch.Tensor) -> torch.Tensor:
            return pixel_shuffle(f, 16)

    raw = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    x = pixel_shuffle(cell_targets(raw, 16).permute(0, 3, 1, 2), 16)  # standardised cells
    gen = torch.Generator().manual_seed(2)
    loss = masked_loss(Cells(), Identity(768, 16), x=x, stride=16, mask_ratio=0.25, generator=gen)
    assert float(loss) == pytest.approx(1.0, abs=1e-3)


def test_pretrain_masked_objective_trains_and_records_it(tmp_path: Path, small_slides: Any) -> None:
    trunk, _, _ = build_trunk("resnet18-l3", "random", seed=0)
    config = PretrainConfig(
        patches_per_image=24,
        objective="masked",
        stage=StageConfig(2, 8, 1e-3, max_steps_per_epoch=2),
    )
    result = _pretrain(small_slides, trunk, config)
    assert result.metrics["objective"] == "masked"
    stage = result.metrics["stage"]
    assert stage["mask_ratio"] == 0.5 and len(stage["loss"]) == 2
    assert all(np.isfinite(stage["loss"]))
    assert not torch.equal(result.state_dict["layer3.0.conv1.weight"], trunk.layer3[0].conv1.weight)
    with pytest.raises(Exception, match="unknown pretraining objective"):
        PretrainConfig(objective="mae")
