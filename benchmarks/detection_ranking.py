"""How the model's detections are ranked (issue 27): against all other classes or against the
background, compared on saved maps.

``detect`` places a class's detections at the local maxima of its log-odds against all other
classes and gives each a ``score`` that PR curves (and users sorting in QuPath) rank by. Two
scores are compared on the same maps and the same detections (the placement does not change):

* ``others``: ``log p_c - log sum_k!=c p_k`` (the linear head's, and before this study every
  model's);
* ``background``: ``log p_c - log p_background`` (:func:`simsearch_wsi.infer.dense.
  ranking_scores`; search heads and their ensemble, ``ClassMaps.rank_against_background``).

No training: it reads the ``maps-*.pkl`` files a ``training_study.py --save-maps`` run wrote
(the test slides' class maps of each case and arm, with their truth) and the search's PR-AUC
from the run's ``rows.json``; one row per saved case and arm, means per split.

    .venv/bin/python benchmarks/detection_ranking.py DIR [DIR ...] [--out report.md]

Results: docs/evaluation.md, "detections of the search heads ranked against the background".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from training_study import ranking_ap

RANKINGS = {"others": False, "background": True}


def _search_means(directory: Path) -> dict[str, float]:
    path = directory / "rows.json"
    if not path.exists():
        return {}
    return {r["case"]: r["arms"]["search"]["mean"] for r in json.loads(path.read_text())}


def score_directory(directory: Path) -> list[dict[str, Any]]:
    """One row per ``maps-*.pkl`` under ``directory``: case, split, arm, the search's PR-AUC
    and the model's under each ranking of :data:`RANKINGS`."""
    search = _search_means(directory)
    rows = []
    for path in sorted(directory.glob("*/maps-*.pkl")):
        with path.open("rb") as f:
            saved = pickle.load(f)
        classes = tuple(c for c in saved["classes"] if c != "background")
        row = {
            "case": saved["case"],
            "split": saved["split"],
            "arm": saved["arm"],
            "search": search.get(saved["case"], float("nan")),
        }
        for name, flag in RANKINGS.items():
            maps = [dataclasses.replace(m, rank_against_background=flag) for m in saved["maps"]]
            ap = ranking_ap(maps, saved["truths"], classes, saved["radius_l0"], saved["spacing"])
            row[name] = float(np.nanmean(list(ap.values())))
        rows.append(row)
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    cols = ["search", *RANKINGS]
    lines = [
        "| case | split | arm | " + " | ".join(cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = " | ".join(f"{r[c]:.3f}" for c in cols)
        lines.append(f"| {r['case']} | {r['split']} | {r['arm']} | {cells} |")
    # "held-out (fresh)" and the like are held-out cases added later: one group
    group = {r["split"]: r["split"].split(" (")[0] for r in rows}
    for split in dict.fromkeys(group.values()):
        for arm in dict.fromkeys(r["arm"] for r in rows):
            sub = [r for r in rows if group[r["split"]] == split and r["arm"] == arm]
            if not sub:
                continue
            means = " | ".join(f"{np.nanmean([r[c] for r in sub]):.3f}" for c in cols)
            wins = " | ".join(f"{sum(r[c] >= r['search'] for r in sub)}/{len(sub)}" for c in cols)
            lines.append(f"| **mean {split}** ({len(sub)}) | | {arm} | {means} |")
            lines.append(f"| >= search, {split} | | {arm} | {wins} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="training_study.py --save-maps outputs")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    rows = [row for d in args.dirs for row in score_directory(d)]
    text = report(rows)
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
