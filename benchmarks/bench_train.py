"""Benchmarks for training (issue 5). Results: docs/benchmarks.md.

    python benchmarks/bench_train.py [--quick] [--device cpu|cuda] [--threads N]

Training throughput in patch-views per second (one view = one augmented crop through the model,
forward and backward), measured side by side in one process on the same cached crops:

* ``selflearn`` (SimCLR, noisy augmentations, batch 64) and ``supcon`` (clean augmentations,
  batch 32, plus negatives): pretrained trunk (conv1 + 2 blocks frozen) vs random trunk (all
  layers trained), bf16 autocast vs fp32;
* ``linear``: pooled-feature extraction for the linear stage (forward only) and the head's fit;
* ``pipeline``: one real ``train_session`` run of the fast preset on a synthetic session, whose
  per-stage views/s include reading, augmentation and the optimiser;
* the paper preset's cost on this machine, extrapolated from the measured rates for a session
  with 1,000 noisy and 200 clean patches.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simsearch_wsi.features.backbones import WeightsInfo, build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.io import open_image
from simsearch_wsi.review.session import Session
from simsearch_wsi.review.simulate import label_from_truth
from simsearch_wsi.search.engine import SimSearch
from simsearch_wsi.search.similarity import PatchGeometry
from simsearch_wsi.train.augment import AugmentConfig, augment_batch
from simsearch_wsi.train.fit import StageConfig, TrainConfig
from simsearch_wsi.train.losses import nt_xent, supcon
from simsearch_wsi.train.model import (
    PatchEncoder,
    ProjectionHead,
    freeze,
    set_trainable,
    train_mode,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step_rate(
    *,
    device: torch.device,
    kind: str,
    freeze_early: bool,
    autocast: bool,
    batch: int,
    steps: int,
) -> float:
    """Views/s of training steps on random crops (68-px patches + 32 px context = 128 px)."""
    trunk, spec, _ = build_trunk("resnet18-l3", "random", seed=0)
    trunk = trunk.to(device).to(memory_format=torch.channels_last)
    geometry = PatchGeometry(68, 68, 16)
    enc = PatchEncoder(trunk, spec, geometry=geometry, rgb=True, context_a=32).to(device)
    head = ProjectionHead(256).to(device)
    params = set_trainable(trunk, freeze_early=freeze_early) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    aug = AugmentConfig.noisy() if kind == "selflearn" else AugmentConfig.clean()
    x = torch.rand(batch, 3, 128, 128, generator=gen).to(device)
    labels = torch.arange(batch, device=device) % 4
    n_neg = batch // 4 if kind == "supcon" else 0
    times = []
    for step in range(steps + 2):
        _sync(device)
        t0 = time.perf_counter()
        v = torch.cat([augment_batch(x, aug, generator=gen, window=64) for _ in range(2)])
        if n_neg:
            v = torch.cat([v, augment_batch(x[:n_neg], aug, generator=gen, window=64)])
        train_mode(trunk, freeze_early=freeze_early)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            z = head(enc(v)).float()
        if kind == "selflearn":
            loss = nt_xent(z[:batch], z[batch : 2 * batch])
        else:
            loss = supcon(
                z[: 2 * batch],
                torch.cat([labels, labels]),
                negatives=z[2 * batch :] if n_neg else None,
                negative_labels=labels[:n_neg] if n_neg else None,
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        _sync(device)
        if step >= 2:  # warm-up
            times.append(time.perf_counter() - t0)
        views = v.shape[0]
    freeze(trunk)
    return views / float(np.median(times))


def _forward_rate(*, device: torch.device, autocast: bool, batch: int, steps: int) -> float:
    trunk, spec, _ = build_trunk("resnet18-l3", "random", seed=0)
    trunk = trunk.to(device).to(memory_format=torch.channels_last)
    geometry = PatchGeometry(68, 68, 16)
    enc = PatchEncoder(trunk, spec, geometry=geometry, rgb=True, context_a=32).to(device)
    enc.eval()
    x = torch.rand(batch, 3, 128, 128, generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    with torch.no_grad():
        for step in range(steps + 2):
            _sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                enc(x)
            _sync(device)
            if step >= 2:
                times.append(time.perf_counter() - t0)
    return batch / float(np.median(times))


def bench_steps(device: torch.device, quick: bool) -> dict[str, Any]:
    steps = 3 if quick else 6
    out: dict[str, Any] = {}
    for kind, batch in (("selflearn", 64), ("supcon", 32)):
        for freeze_early in (True, False):
            for autocast in (True, False):
                key = (
                    f"{kind} {'pretrained (frozen early)' if freeze_early else 'random (all)'} "
                    f"{'bf16' if autocast else 'fp32'}"
                )
                out[key] = round(
                    _step_rate(
                        device=device,
                        kind=kind,
                        freeze_early=freeze_early,
                        autocast=autocast,
                        batch=batch,
                        steps=steps,
                    ),
                    1,
                )
    for autocast in (True, False):
        key = f"linear-stage features (forward) {'bf16' if autocast else 'fp32'}"
        out[key] = round(_forward_rate(device=device, autocast=autocast, batch=64, steps=steps), 1)
    return out


def bench_pipeline(work: Path, device: torch.device, quick: bool) -> dict[str, Any]:
    """A real fast-preset run on a synthetic session (reading, augmentation, optimiser)."""
    from simsearch_wsi.review.data import train_session
    from simsearch_wsi.synthetic import make_synthetic_slide

    kw = {"width": 1024, "height": 768, "n_per_class": 6}
    a = make_synthetic_slide(work / "a.tiff", seed=0, **kw)
    c = make_synthetic_slide(work / "c.tiff", seed=2, **kw)
    session = label_from_truth(
        Session.create(work / "session"), a, positives_per_class=3, background=4
    )
    trunk, spec, info = build_trunk("resnet18-l3", "random", seed=0)
    # pretend the weights are pretrained so the frozen-early path is what is timed
    info = WeightsInfo("file", info.identity, "random weights timed as pretrained")
    search = SimSearch(FeatureExtractor(trunk, spec, info, device=device), FeatureCache(work / "c"))
    config = TrainConfig.preset_config("fast")
    if quick:
        config = config.replace(
            selflearn=StageConfig(3, 64, 1e-3, max_steps_per_epoch=4),
            supcon=StageConfig(4, 32, 1e-3, temperature=0.07, max_steps_per_epoch=4),
        )
    t0 = time.perf_counter()
    result = train_session(
        session,
        search,
        config=config,
        open_image=lambda p: open_image(p),
        noisy_images=[c.path],
        device=device,
    )
    total = time.perf_counter() - t0
    stages = {
        name: {k: s.get(k) for k in ("seconds", "views", "views_per_s")}
        for name, s in result.metrics["stages"].items()
    }
    return {"total_seconds": round(total, 1), "stages": stages, "counts": result.metrics["counts"]}


def paper_cost(rates: dict[str, Any], *, n_noisy: int = 1000, n_clean: int = 200) -> dict[str, Any]:
    """Hours of the paper preset for ``n_noisy`` noisy and ``n_clean`` clean patches."""
    paper = TrainConfig.preset_config("paper")
    views_self = paper.selflearn.epochs * paper.selflearn.steps_per_epoch(n_noisy) * 128 * 2
    views_sup = paper.supcon.epochs * paper.supcon.steps_per_epoch(n_clean) * 32 * 2
    out = {"selflearn views": views_self, "supcon views": views_sup}
    for label, key_self, key_sup in (
        (
            "pretrained, bf16",
            "selflearn pretrained (frozen early) bf16",
            "supcon pretrained (frozen early) bf16",
        ),
        ("random, bf16", "selflearn random (all) bf16", "supcon random (all) bf16"),
    ):
        hours = (views_self / rates[key_self] + views_sup / rates[key_sup]) / 3600
        out[f"hours ({label})"] = round(hours, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    results["steps_views_per_s"] = bench_steps(device, args.quick)
    results["paper_preset"] = paper_cost(results["steps_views_per_s"])
    with tempfile.TemporaryDirectory() as tmp:
        results["pipeline_fast_preset"] = bench_pipeline(Path(tmp), device, args.quick)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
