"""Backbone registry: fully convolutional feature trunks and where their weights come from.

A :class:`BackboneSpec` states the trunk's contract (output stride, channels, receptive field,
input normalisation) so that tiling, pooling and caching can be derived from it. One factory,
:func:`build_trunk`, builds any registered trunk with weights from

* ``"imagenet"``: torchvision's published ResNet-18 checkpoint, taken from ``cache_dir`` (the
  torch hub cache; the CLI passes ``torch.hub.get_dir()``) and verified by sha256, or downloaded
  there when ``allow_download`` is set (with a timeout; offline fails at once with advice);
* ``"embedded"``: the self-supervised trunk this project trained itself and ships inside the
  package (``simsearch_wsi/weights/``; provenance and licence in its README there): the offline
  default;
* ``"random"``: seeded random initialisation (tests, or to measure what weights add);
* a path: a local weights file (a torchvision state dict, a trunk state dict, or a file written
  by ``simsearch-wsi pretrain``).

:func:`resolve_auto_weights` is the ``auto`` order: ImageNet from the cache, ImageNet downloaded
(when allowed), else the embedded trunk, with a notice saying which and how to get ImageNet.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simsearch_wsi.core.errors import ConfigError, SimSearchError


class WeightsUnavailableError(SimSearchError, FileNotFoundError):
    """The requested backbone weights are not on disk and cannot be downloaded."""


@dataclass(frozen=True)
class PublishedWeights:
    """A checkpoint published at ``url`` whose sha256 is known."""

    url: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class BackboneSpec:
    """What a trunk promises to the rest of the engine.

    ``stride``: input pixels per output cell; ``receptive_field``: input pixels that influence
    one output cell (tiles need a halo of at least half of it to be seam-free);
    ``input_mean``/``input_std``: per-channel normalisation of [0, 1] RGB input.
    """

    name: str
    stride: int
    out_channels: int
    receptive_field: int
    input_mean: tuple[float, float, float]
    input_std: tuple[float, float, float]
    builder: Callable[[], nn.Module]
    imagenet: PublishedWeights | None = None
    embedded: str | None = None

    @property
    def halo(self) -> int:
        """Tile halo in input pixels: half the receptive field rounded up to the stride."""
        half = (self.receptive_field + 1) // 2
        return -(-half // self.stride) * self.stride


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a trunk carries: ``kind`` (imagenet/random/file) and a stable identity."""

    kind: str
    identity: str
    description: str


class ResNetTrunk(nn.Module):
    """ResNet conv1..layer3: output stride 16. Attribute names match torchvision's ResNet so its
    state dicts load directly (``fc`` and ``layer4`` are ignored)."""

    def __init__(self, arch: str = "resnet18") -> None:
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised input -> (N, 256, ceil(H/16), ceil(W/16)) features."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out: torch.Tensor = self.layer3(self.layer2(self.layer1(x)))
        return out


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_REGISTRY: dict[str, BackboneSpec] = {}

#: the embedded trunk's file in ``simsearch_wsi/weights`` (benchmarks/train_embedded_trunk.py)
EMBEDDED_RESNET18_L3 = "resnet18-l3-ssl.pt"


def register_backbone(spec: BackboneSpec) -> None:
    """Add a trunk (e.g. a pathology foundation model a user has on disk) to the registry."""
    _REGISTRY[spec.name] = spec


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown backbone {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def available_backbones() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


register_backbone(
    BackboneSpec(
        name="resnet18-l3",
        stride=16,
        out_channels=256,
        # conv1 7/2 -> 7, maxpool 3/2 -> 11, layer1 4x3/1 -> 43, layer2 -> 99, layer3 -> 211
        receptive_field=211,
        input_mean=_IMAGENET_MEAN,
        input_std=_IMAGENET_STD,
        builder=lambda: ResNetTrunk("resnet18"),
        imagenet=PublishedWeights(
            url="https://download.pytorch.org/models/resnet18-f37072fd.pth",
            filename="resnet18-f37072fd.pth",
            sha256="f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec",
        ),
        embedded=EMBEDDED_RESNET18_L3,
    )
)


def sha256_of(path: Path, *, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _random_init(module: nn.Module, seed: int) -> None:
    """Seeded He initialisation with a private generator (global RNG untouched)."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=gen)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _download(weights: PublishedWeights, target: Path, timeout_s: float) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
    tmp = Path(tmp_name)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(weights.url, timeout=timeout_s) as response,
        ):
            shutil.copyfileobj(response, out)
        if sha256_of(tmp) != weights.sha256:
            raise WeightsUnavailableError(
                f"{weights.url}: downloaded file does not match the published sha256; "
                "retry, or download it yourself and pass --weights PATH"
            )
        tmp.replace(target)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise WeightsUnavailableError(
            f"ImageNet weights could not be downloaded from {weights.url} ({exc}); "
            f"copy {weights.filename} into {target.parent} or pass --weights PATH / "
            "--weights random"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _imagenet_state(
    spec: BackboneSpec, cache_dir: Path | None, allow_download: bool, timeout_s: float
) -> tuple[dict[str, Any], WeightsInfo]:
    pub = spec.imagenet
    if pub is None:
        raise ConfigError(f"backbone {spec.name!r} has no published ImageNet weights")
    if cache_dir is None:
        raise WeightsUnavailableError(
            f"no torch hub cache folder given to look for {pub.filename}; pass --weights PATH"
        )
    path = cache_dir / "checkpoints" / pub.filename
    if not path.exists():
        if not allow_download:
            raise WeightsUnavailableError(
                f"ImageNet weights {pub.filename} not found in {path.parent}; copy the file there "
                f"(from {pub.url}), pass --weights PATH, or --weights random"
            )
        _download(pub, path, timeout_s)
    digest = sha256_of(path)
    if digest != pub.sha256:
        raise WeightsUnavailableError(
            f"{path}: sha256 {digest[:12]}... does not match the published "
            f"{pub.sha256[:12]}...; delete the file and download it again"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state, WeightsInfo(
        "imagenet", f"imagenet:{pub.sha256[:16]}", f"ImageNet ({pub.filename}, sha256 verified)"
    )


def embedded_weights_path(spec: BackboneSpec) -> Path:
    """Where the package keeps ``spec``'s embedded weights (the file may be absent)."""
    if spec.embedded is None:
        raise ConfigError(f"backbone {spec.name!r} has no embedded weights")
    return Path(str(importlib.resources.files("simsearch_wsi") / "weights" / spec.embedded))


def _embedded_state(spec: BackboneSpec) -> tuple[dict[str, Any], WeightsInfo]:
    path = embedded_weights_path(spec)
    if not path.is_file():
        raise WeightsUnavailableError(
            f"the embedded weights {path.name} are missing from this installation ({path.parent}); "
            "reinstall simsearch_wsi, or pass --weights imagenet / PATH / random"
        )
    obj = torch.load(path, map_location="cpu", weights_only=True)
    meta = json.loads(obj.get("simsearch_wsi", "{}"))
    state = {k: v.float() if v.is_floating_point() else v for k, v in obj["state_dict"].items()}
    digest = sha256_of(path)
    what = meta.get("description", "self-supervised")
    return state, WeightsInfo(
        "embedded", f"embedded:{digest[:16]}", f"embedded trunk {path.name} ({what})"
    )


_WEIGHTS_FILE_HINT = (
    "pass a file saved with torch.save(trunk.state_dict(), PATH), or --weights auto, imagenet, "
    "embedded or random"
)


def _load_failure(exc: BaseException) -> str:
    """One clause saying why ``torch.load(weights_only=True)`` failed.

    torch's own message for a pickle of arbitrary objects is several lines of advice on loading
    untrusted files with ``weights_only=False``, which this tool never does; keep the reason.
    """
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it pickles the Python object {found.group(1)}, not only tensors"
    if type(exc).__name__ == "UnpicklingError":
        return "it is a pickle of Python objects, not only tensors"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if len(first) > 120:
        first = first[:117] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _file_state(path: Path) -> tuple[dict[str, Any], WeightsInfo]:
    if not path.is_file():
        raise WeightsUnavailableError(
            f"{path}: weights file not found; pass an existing .pth file, 'imagenet' or 'random'"
        )
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt pickle/zip
        raise WeightsUnavailableError(
            f"{path}: not a PyTorch weights file simsearch-wsi can load ({_load_failure(exc)}); "
            f"{_WEIGHTS_FILE_HINT}"
        ) from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise WeightsUnavailableError(
            f"{path}: holds a {type(obj).__name__}, not a state dict of trunk weights; "
            f"{_WEIGHTS_FILE_HINT}"
        )
    digest = sha256_of(path)
    return state, WeightsInfo("file", f"file:{digest[:16]}", f"weights file {path.name}")


def build_trunk(
    name: str = "resnet18-l3",
    weights: str | Path = "random",
    *,
    seed: int = 0,
    cache_dir: Path | None = None,
    allow_download: bool = False,
    download_timeout_s: float = 20.0,
) -> tuple[nn.Module, BackboneSpec, WeightsInfo]:
    """Build a registered trunk in eval mode on the CPU, with the chosen weights.

    Returns the module, its spec and a :class:`WeightsInfo` whose ``identity`` keys caches.
    """
    spec = get_backbone_spec(name)
    with torch.random.fork_rng(devices=[]):  # builders' default init must not move global RNG
        module = spec.builder()
    if isinstance(weights, str) and weights == "random":
        _random_init(module, seed)
        info = WeightsInfo("random", f"random:seed{seed}", f"seeded random initialisation ({seed})")
    else:
        if isinstance(weights, str) and weights == "imagenet":
            state, info = _imagenet_state(spec, cache_dir, allow_download, download_timeout_s)
        elif isinstance(weights, str) and weights == "embedded":
            state, info = _embedded_state(spec)
        else:
            state, info = _file_state(Path(weights))
        trunk_keys = set(module.state_dict())
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k.removeprefix("trunk."): v for k, v in state.items()}
        usable = {k: v for k, v in state.items() if k in trunk_keys}
        missing = trunk_keys - set(usable)
        if missing:
            where = str(weights) if info.kind == "file" else info.description
            raise WeightsUnavailableError(
                f"{where}: {len(missing)} trunk parameters missing (e.g. "
                f"{sorted(missing)[0]}); the file is not for backbone {name!r}"
            )
        module.load_state_dict(usable, strict=True)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module, spec, info


def imagenet_advice(spec: BackboneSpec, cache_dir: Path | None) -> str:
    """How to get ``spec``'s ImageNet weights, in one clause."""
    if spec.imagenet is None:
        return f"backbone {spec.name!r} has no published ImageNet weights"
    where = cache_dir / "checkpoints" if cache_dir is not None else "the torch hub cache"
    return (
        f"for ImageNet weights run once with internet (--weights imagenet) or copy "
        f"{spec.imagenet.filename} ({spec.imagenet.url}) into {where}"
    )


def resolve_auto_weights(
    name: str = "resnet18-l3",
    *,
    cache_dir: Path | None,
    allow_download: bool,
    download_timeout_s: float = 10.0,
) -> tuple[nn.Module, BackboneSpec, WeightsInfo, str | None]:
    """The ``auto`` weights: ImageNet from ``cache_dir``; else ImageNet downloaded there (when
    ``allow_download``); else the embedded trunk. Returns the trunk, its spec, its weights and
    a one-line notice (``None`` when ImageNet weights were used) saying which weights were used
    and how to get ImageNet weights. Falls back to seeded random weights (with a notice) only
    for a registered backbone that has neither ImageNet nor embedded weights."""
    spec = get_backbone_spec(name)
    failure = ""
    if spec.imagenet is not None:
        for download in (False, True) if allow_download else (False,):
            try:
                trunk, spec, info = build_trunk(
                    name,
                    "imagenet",
                    cache_dir=cache_dir,
                    allow_download=download,
                    download_timeout_s=download_timeout_s,
                )
                return trunk, spec, info, None
            except WeightsUnavailableError as exc:
                failure = (
                    f"could not be downloaded ({exc.__cause__ or exc})"
                    if download
                    else "are not cached"
                )
    if spec.embedded is not None:
        trunk, spec, info = build_trunk(name, "embedded")
        reason = f"ImageNet weights {failure}" if failure else "no ImageNet weights"
        return (
            trunk,
            spec,
            info,
            f"using the {info.description} ({reason}); {imagenet_advice(spec, cache_dir)}",
        )
    trunk, spec, info = build_trunk(name, "random", seed=0)
    return trunk, spec, info, f"using seeded random weights for {name!r} (no weights available)"
