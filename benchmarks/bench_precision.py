"""Does bf16 autocast pay off on this CPU? fp32 vs bf16 autocast, side by side in one run.

The bare trunk (resnet18-l3, seeded random weights) on the same tensors: a training step
(forward + backward + Adam, a batch of 32 crops of 112 x 112 px, what a contrastive stage runs)
and dense inference (a batch of 4 tiles of 512 x 512 px, what `embed` and `predict` run). Also
prints what oneDNN reports (native bf16 or not), which is what
``simsearch_wsi.features.precision.autocast_pays_off`` uses to decide.

    .venv/bin/python benchmarks/bench_precision.py            # about a minute on 2 cores
    .venv/bin/python benchmarks/bench_precision.py --repeats 5

Results and the command: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import torch

from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.precision import cpu_has_native_bf16


def _best(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    trunk, _, _ = build_trunk("resnet18-l3", "random", seed=0)
    trunk = trunk.to(memory_format=torch.channels_last).requires_grad_(True)
    opt = torch.optim.Adam(trunk.parameters(), lr=1e-4)
    crops = torch.randn(32, 3, 112, 112).contiguous(memory_format=torch.channels_last)
    tiles = torch.randn(4, 3, 512, 512).contiguous(memory_format=torch.channels_last)
    out: dict[str, object] = {
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "native_bf16 (oneDNN)": cpu_has_native_bf16(),
        "capability": torch.backends.cpu.get_cpu_capability(),
    }
    for name, enabled in (("fp32", False), ("bf16 autocast", True)):

        def step(enabled: bool = enabled) -> None:
            trunk.train()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                loss = trunk(crops).float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def infer(enabled: bool = enabled) -> None:
            trunk.eval()
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=enabled):
                trunk(tiles)

        train_s = _best(step, args.repeats)
        infer_s = _best(infer, args.repeats)
        out[name] = {
            "train views/s": round(len(crops) / train_s, 1),
            "infer MP/s": round(tiles.numel() / 3 / 1e6 / infer_s, 3),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
