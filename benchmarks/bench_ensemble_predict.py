"""What the ensemble model (``train --head-input ensemble``, the default ``auto`` after a real
review) costs at inference against one search head (issue 27).

Loads an ensemble bundle and times ``dense_class_maps`` on one image for: the ensemble, its
search head on the fine-tuned trunk alone, and its partner (the search head on the search's
trunk) alone, each into a fresh feature cache, interleaved over ``--repeats``; minimum per
arm. Run::

    .venv/bin/python benchmarks/bench_ensemble_predict.py MODEL.zip IMAGE --threads 1

e.g. with the model and test slide ``benchmarks/demo_heads.py ensemble`` writes under
``bench_output/demo_heads/ensemble``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from simsearch_wsi.infer.dense import PatchModel, dense_class_maps
from simsearch_wsi.io import open_image
from simsearch_wsi.train.bundle import load_bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("image", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model)
    if bundle.partner is None:
        raise SystemExit(f"{args.model}: not an ensemble (no partner model)")
    arms = {
        "ensemble": bundle,
        "fine-tuned search head alone": dataclasses.replace(bundle, partner=None),
        "partner (search's trunk) alone": bundle.partner,
    }
    times: dict[str, list[float]] = {name: [] for name in arms}
    with open_image(args.image) as image:
        w, h = image.level_dimensions[0]
        for _ in range(args.repeats):
            for name, b in arms.items():
                with tempfile.TemporaryDirectory() as cache:
                    model = PatchModel(b, cache_dir=cache)
                    t0 = time.perf_counter()
                    dense_class_maps(image, model)
                    times[name].append(time.perf_counter() - t0)
    out = {
        "image": str(args.image),
        "size_px": [w, h],
        "threads": torch.get_num_threads(),
        "seconds": {k: [round(v, 2) for v in vs] for k, vs in times.items()},
        "min_seconds": {k: round(min(vs), 2) for k, vs in times.items()},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
