"""What object candidates (``suggest --candidates objects``; what ``auto``, the default, picks
for separate objects) cost against the grid, per suggest, on the search quality suite's plate
field and IHC cell field (issue 18).

Each image is embedded once first (the feature cache is shared, so every timed suggest reads
its map); then ``suggest`` runs with ``candidates=grid``, ``objects`` and ``auto``,
interleaved over ``--repeats``, from the same prototypes (2 per class, the suite's draw).
Reported per arm: the minimum wall time of the whole ``suggest`` call and its
``seconds_query`` (what follows the embedding: similarity maps, candidates, and for objects
their detection and embedding). Run::

    .venv/bin/python benchmarks/bench_candidates.py --out bench_output/candidates --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from search_suite import Case, ihc_case, plate_case

from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.io import open_image
from simsearch_wsi.search.engine import SearchSettings, SimSearch
from simsearch_wsi.search.similarity import Prototype

ARMS = ("grid", "objects", "auto")


def _prototypes(case: Case, per_class: int) -> list[Prototype]:
    rng = np.random.default_rng([7, per_class])
    out = []
    for c in case.classes:
        n = len(case.review.truth.boxes(c))
        for k in rng.choice(n, size=min(per_class, n), replace=False):
            out.append(Prototype(c, case.boxes(c, int(k)), image=str(case.review.path)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    trunk, spec, info = build_trunk("resnet18-l3", "embedded", seed=0)
    extractor = FeatureExtractor(trunk, spec, info, device=torch.device("cpu"), autocast=False)
    search = SimSearch(extractor, FeatureCache(args.out / "cache"), settings=SearchSettings())
    cases = (plate_case(args.out, 410, size=512), ihc_case(args.out, 210, size=384))
    rows: list[dict[str, Any]] = []
    for case in cases:
        protos = _prototypes(case, 2)
        test = case.test[0]
        with open_image(test.path) as img:
            search.with_settings(candidates="grid").suggest(img, protos)  # embeds (cached)
            times: dict[str, list[tuple[float, float, int, str]]] = {a: [] for a in ARMS}
            for _ in range(args.repeats):
                for arm in ARMS:
                    t0 = time.perf_counter()
                    result = search.with_settings(candidates=arm).suggest(img, protos)
                    wall = time.perf_counter() - t0
                    times[arm].append(
                        (wall, result.seconds_query, len(result.suggestions), result.candidates)
                    )
        for arm in ARMS:
            best = min(times[arm])
            rows.append(
                {
                    "case": case.name,
                    "image": f"{img.dimensions[0]}x{img.dimensions[1]} px",
                    "arm": arm,
                    "resolved": best[3],
                    "seconds": round(best[0], 3),
                    "seconds_query": round(best[1], 3),
                    "suggestions": best[2],
                }
            )
    (args.out / "candidates.json").write_text(json.dumps(rows, indent=1))
    print("| case | image | candidates | resolved | suggest s | query s | suggestions |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['image']} | {r['arm']} | {r['resolved']} | {r['seconds']:.2f} | "
            f"{r['seconds_query']:.2f} | {r['suggestions']} |"
        )


if __name__ == "__main__":
    main()
