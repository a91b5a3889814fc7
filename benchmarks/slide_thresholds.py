"""Thresholds that follow the slide being predicted (issue 27): rules compared on saved maps.

A trained model's per-class thresholds are set from the reviewed slide (held-out patches,
leave-one-out patches, unlabelled windows; :class:`simsearch_wsi.train.fit.ThresholdEvidence`).
Where a test slide's probabilities sit lower or higher than the reviewed slide's as a whole, no
such threshold fits it (docs/evaluation.md, "2026-12-07: thresholds of the combined
probability"). The rules here also look at the slide being predicted, as ``predict`` could:

* ``bundle``: the bundle's own thresholds (the default rule, ``held-out-f1``), the baseline;
* ``tail``: :func:`~simsearch_wsi.train.fit.tail_thresholds` (reviewed slide only);
* ``shift qQ [of R]``: rule R's threshold moved, in logit space, by how much the slide's windows'
  Q quantile differs from the reviewed slide's unlabelled windows' (the class's detection score:
  its probability where it is the most probable user class, else 0, as ``detect`` keeps it),
  ``t = sigmoid(logit(t_R) + logit(q_slide) - logit(q_reviewed))``, clipped to [0.05, 0.95];
* ``shift qQ x0.5``: the same with half the shift.

No training: it reads the ``maps-*.pkl`` files a ``training_study.py --save-maps`` run wrote
(the test slides' class maps, their truth and the threshold evidence) and scores every rule with
:func:`simsearch_wsi.eval.ablation.score_class_maps` (detection F1 and segmentation IoU at the
thresholds, class means), one row per saved case and arm, means per split.

    .venv/bin/python benchmarks/slide_thresholds.py DIR [DIR ...] [--out report.md]

Results: docs/evaluation.md, "Training study".
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit, logit

from simsearch_wsi.eval.ablation import score_class_maps
from simsearch_wsi.infer.dense import ClassMaps
from simsearch_wsi.train.fit import ThresholdEvidence, detection_scores, tail_thresholds

QUANTILES = (0.9, 0.95, 0.98, 0.99)


#: probabilities are clipped to [EPS, 1 - EPS] before their logit (a quantile of 0 or 1)
EPS = 1e-4


def _logit(p: float) -> float:
    return float(logit(np.clip(p, EPS, 1 - EPS)))


def slide_window_probs(maps: ClassMaps) -> Any:
    """(N, K) class probabilities of every window of one slide that was embedded."""
    probs = np.asarray(maps.probabilities, dtype=np.float64)  # (K, H, W)
    flat = probs.reshape(probs.shape[0], -1).T
    return flat[np.isfinite(flat).all(axis=1)]


def rules_for_slide(
    ev: ThresholdEvidence, bundled: dict[str, float], maps: ClassMaps
) -> dict[str, dict[str, float]]:
    """Per rule, the thresholds it picks for one test slide."""
    classes = ev.classes
    base = {"bundle": dict(bundled)}
    base["tail"] = {**bundled, **{c: v["threshold"] for c, v in tail_thresholds(ev).items()}}
    out = dict(base)
    if ev.unlabelled_probs is None:
        return out
    scored = {
        "det": (
            detection_scores(ev.unlabelled_probs, classes),
            detection_scores(slide_window_probs(maps), classes),
        ),
        "raw": (np.asarray(ev.unlabelled_probs, dtype=np.float64), slide_window_probs(maps)),
    }
    for (kind, (reviewed, here)), q in ((kv, q) for kv in scored.items() for q in QUANTILES):
        for name, t0 in base.items():
            for gain in (1.0, 0.5):
                rule = f"shift {kind} q{q:g} of {name}" + ("" if gain == 1.0 else f" x{gain:g}")
                picked = dict(t0)
                for k, c in enumerate(classes):
                    if c == "background" or c not in t0:
                        continue
                    shift = _logit(float(np.quantile(here[:, k], q))) - _logit(
                        float(np.quantile(reviewed[:, k], q))
                    )
                    z = _logit(t0[c]) + gain * shift
                    picked[c] = float(np.clip(expit(z), 0.05, 0.95))
                out[rule] = picked
    return out


def score_saved(path: Path) -> dict[str, Any] | None:
    with path.open("rb") as f:
        saved = pickle.load(f)
    ev = saved["evidence"]
    if ev is None:
        return None
    rules: dict[str, dict[str, Any]] = {}
    for m, truth in zip(saved["maps"], saved["truths"], strict=True):
        for rule, t in rules_for_slide(ev, saved["thresholds"], m).items():
            scores = score_class_maps(
                [m],
                [truth],
                classes=saved["classes"],
                thresholds=t,
                radius_l0=saved["radius_l0"],
                spacing_patches=saved["spacing"],
            )
            acc = rules.setdefault(rule, {"f1": [], "iou": []})
            acc["f1"].append(np.nanmean([s.f1 for s in scores]))
            acc["iou"].append(np.nanmean([s.iou for s in scores]))
    return {
        "case": saved["case"],
        "split": saved["split"],
        "arm": saved["arm"],
        "rules": {r: (float(np.mean(v["f1"])), float(np.mean(v["iou"]))) for r, v in rules.items()},
    }


def report(rows: list[dict[str, Any]]) -> str:
    names = list(dict.fromkeys(r for row in rows for r in row["rules"]))
    out = []
    for split in dict.fromkeys(row["split"] for row in rows):
        sub = [row for row in rows if row["split"] == split]
        out.append(f"## {split} ({len(sub)} cases)\n")
        out.append(
            "| rule | F1 mean | IoU mean | F1 up / down vs bundle | "
            + " | ".join(row["case"] for row in sub)
            + " |"
        )
        out.append("|---|---|---|---|" + "---|" * len(sub))
        for n in names:
            have = [row["rules"][n] for row in sub if n in row["rules"]]
            base = [row["rules"]["bundle"] for row in sub if n in row["rules"]]
            up = sum(h[0] > b[0] + 0.005 for h, b in zip(have, base, strict=True))
            down = sum(h[0] < b[0] - 0.005 for h, b in zip(have, base, strict=True))
            cells = [
                f"{row['rules'][n][0]:.2f} / {row['rules'][n][1]:.2f}" if n in row["rules"] else ""
                for row in sub
            ]
            out.append(
                f"| {n} | {np.mean([h[0] for h in have]):.3f} | "
                f"{np.mean([h[1] for h in have]):.3f} | {up} / {down} | " + " | ".join(cells) + " |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="--save-maps output folders")
    parser.add_argument("--out", type=Path, default=None, help="also write the report there")
    args = parser.parse_args()
    rows = []
    for d in args.dirs:
        for path in sorted(d.glob("*/maps-*.pkl")):
            row = score_saved(path)
            if row is not None:
                rows.append(row)
    text = report(rows)
    if args.out is not None:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
