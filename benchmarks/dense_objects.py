"""Dense small objects: can suggestions reach every nucleus or blood cell of a crowded field?

Three seeded cases (:func:`simsearch_wsi.synthetic.dense.make_dense_field`), each a review field
(prototypes: P random objects, each box drawn tightly around the object, as a user outlines
nuclei) and a held-out test field of another seed:

* ``fluorescence nuclei``: 16-bit DAPI/GFP field, nuclei of radius ~7 px, centres >= 1.15
  diameters apart (neighbours nearly touch);
* ``blood cells``: brightfield (uint8 RGB) red blood cells with a pale centre, touching
  (centres >= 1.0 diameter apart);
* ``touching nuclei``: as the first, overlapping (centres >= 0.85 diameters apart).

Every suggestion above -1 (all candidates) is a detection ranked by similarity; matching as
:func:`simsearch_wsi.eval.metrics.class_pr` (rank order; each true centre matched at most once,
each detection at most once) within two tolerances: the paper's radius, 0.3 x the box the user
drew (here the object box, median over the test field's objects), and 0.5 x the box (the
detection's centre lies inside the object; an overlapped nucleus shows only part of itself, so
its visible centre is off its true centre). ``recall`` is the recall at the best threshold (all
candidates: the end of the PR curve), ``PR-AUC`` the area under it; mean (min) over
``--repeats`` prototype draws. Modes: ``patch`` (the search as before: suggestions a patch
apart, boxes of the patch), ``dense`` (``SearchSettings(dense=True)``) and ``dense-fine``
(``dense_fine=True`` too: a finer analysis scale). ``--tune`` uses fields of other seeds (what
the fractions were chosen on); the reported table uses the default seeds.

``--predict`` (with mode ``dense``) also trains a search-head model on each review field and
scores its detections with ``detect``'s patch rule and with ``object_size_l0``; the model's
patch is half the object, or the object box with ``--predict-before``.

    .venv/bin/python benchmarks/dense_objects.py --out bench_output/dense --threads 1
    .venv/bin/python benchmarks/dense_objects.py --out DIR --modes dense --predict

Writes ``results.json`` and ``results.md`` under --out. Results: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simsearch_wsi.eval.metrics import class_pr
from simsearch_wsi.eval.truth import read_truth_csv
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.io import open_image
from simsearch_wsi.search.engine import SearchSettings, SimSearch
from simsearch_wsi.search.similarity import DENSE_POOL_FRACTION, Prototype
from simsearch_wsi.synthetic.dense import make_dense_field

#: name -> make_dense_field arguments (review seed 100 + k, test seed 200 + k)
CASES: dict[str, dict[str, Any]] = {
    "fluorescence nuclei": {"kind": "fluorescence", "radius": 7.0, "spacing": 1.15},
    "blood cells": {"kind": "blood", "radius": 8.0, "spacing": 1.0},
    "touching nuclei": {"kind": "fluorescence", "radius": 7.0, "spacing": 0.85},
}
#: match tolerances, as fractions of the object box: the paper's (0.3 x the patch the user drew,
#: here the object box) and "the detection's centre lies inside the object" (0.5 x the box)
RADII = {"0.3 box": 0.3, "0.5 box": 0.5}
MODES = {
    "patch": SearchSettings(dense=False, max_per_class=100_000),
    "dense": SearchSettings(dense=True, max_per_class=100_000),
    "dense-fine": SearchSettings(dense=True, dense_fine=True, max_per_class=100_000),
}


def _predict_scores(
    search: SimSearch,
    review: Any,
    test: Any,
    truth: Any,
    *,
    size: float,
    seed: int,
    before: bool = False,
) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Detections of a model trained (search head, ``quick`` preset, strategy ``pos``) on the
    review field, as a user who approved 60 suggestions there would: positives at 60 random
    objects' centres, background at 60 random points at least half an object from every centre
    (gaps and the borders between touching objects); more patches would not fit in memory on a
    small machine (the search head embeds every patch in one batch). Scored on the test field with
    ``detect`` as before (a patch apart) and with ``object_size_l0``: rule -> tolerance ->
    (recall, PR-AUC, detections). ``before``: the model of a session without ``--dense`` (its
    patch the object box, not half of it)."""
    from simsearch_wsi.features.preprocess import fit_normalization
    from simsearch_wsi.infer.dense import PatchModel, dense_class_maps, detect
    from simsearch_wsi.review.data import SearchVectors
    from simsearch_wsi.train.fit import TrainConfig, TrainingData, train_patch_model
    from simsearch_wsi.train.patches import PatchSample, PatchSet

    cls = review.classes[0]
    classes = (cls, "background")
    centres = np.array([o.center_l0 for o in review.objects])
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(centres), size=min(60, len(centres)), replace=False)
    samples = [
        PatchSample(str(review.path), (float(centres[i, 0]), float(centres[i, 1])), 0)
        for i in sorted(chosen)
    ]
    background: list[PatchSample] = []
    while len(background) < 60:
        x, y = rng.uniform(size, review.width - size), rng.uniform(size, review.height - size)
        if np.hypot(*(centres - (x, y)).T).min() >= 0.5 * size:
            background.append(PatchSample(str(review.path), (float(x), float(y)), 1))
    patch = size if before else DENSE_POOL_FRACTION * size
    with open_image(review.path) as img:
        data = TrainingData(
            clean=PatchSet(tuple(samples + background), classes),
            negatives=PatchSet((), classes),
            noisy=PatchSet((), classes),
            patch_size_l0=(patch, patch),
            normalization=fit_normalization([img]),
            channels=img.channel_names,
            rgb=img.is_brightfield and img.n_channels == 3,
            mpp=img.mpp,
            colors={c: (200, 0, 0) for c in classes},
        )
    config = TrainConfig.preset_config("quick", strategy="pos").replace(head_input="search")
    result = train_patch_model(
        data,
        search.extractor,
        config=config,
        open_image=open_image,
        search=SearchVectors(search, (patch, patch), open_image=open_image),
        seed=seed,
    )
    with open_image(test.path) as img:
        maps = dense_class_maps(img, PatchModel(result.bundle))
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    rules: list[tuple[str, tuple[float, float] | None]] = [
        ("a patch apart", None),
        ("object size", (size, size)),
    ]
    if before:
        rules = [(f"object-box patch, {rule}", obj) for rule, obj in rules]
    for rule, obj in rules:
        dets = detect(maps, {cls: 0.0}, object_size_l0=obj)
        out[rule] = {}
        for tol, fraction in RADII.items():
            pr = class_pr(
                dets,
                truth,
                class_name=cls,
                max_distance_l0=fraction * size,
                score=lambda d: d.score,
            )
            out[rule][tol] = (pr.n_tp / pr.n_true, pr.ap, len(dets))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_output/dense"))
    parser.add_argument("--size", type=int, default=512, help="field side in px")
    parser.add_argument("--prototypes", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--predict",
        action="store_true",
        help="also train a model (search head) on each review field and score its detections",
    )
    parser.add_argument(
        "--predict-before",
        action="store_true",
        help="with --predict: the model a session without --dense trains (object-box patch)",
    )
    parser.add_argument(
        "--tune", action="store_true", help="fields of other seeds (300 + k, 400 + k) for tuning"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    trunk, bspec, info = build_trunk("resnet18-l3", "embedded", seed=0)
    extractor = FeatureExtractor(trunk, bspec, info, device=torch.device("cpu"))
    cache = FeatureCache(out / "cache")
    rows: list[dict[str, Any]] = []
    names = [c for c in args.cases.split(",") if c]
    for k, name in enumerate(CASES):
        if name not in names:
            continue
        params = CASES[name]
        fields = {}
        base = 300 if args.tune else 100
        for role, seed in (("review", base + k), ("test", base + 100 + k)):
            slug = name.replace(" ", "_") + ("-tune" if args.tune else "")
            fields[role] = make_dense_field(
                out / f"{slug}-{role}.tiff", width=args.size, height=args.size, seed=seed, **params
            )
        review, test = fields["review"], fields["test"]
        cls = review.classes[0]
        truth = read_truth_csv(test.to_csv(test.path.with_suffix(".csv")), classes=(cls,))
        size = float(np.median([max(o.width_l0, o.height_l0) for o in test.objects]))
        for mode in [m for m in args.modes.split(",") if m]:
            search = SimSearch(extractor, cache, settings=MODES[mode])
            scores: dict[str, list[tuple[float, float]]] = {t: [] for t in RADII}
            n_pred, secs = [], []
            for r in range(args.repeats):
                rng = np.random.default_rng([0, r])
                picks = rng.choice(len(review.objects), size=args.prototypes, replace=False)
                protos = [
                    Prototype(cls, review.objects[int(i)].box, image=str(review.path))
                    for i in sorted(picks)
                ]
                t0 = time.perf_counter()
                with open_image(test.path) as img:
                    res = search.suggest(img, protos, thresholds={cls: -1.0})
                secs.append(time.perf_counter() - t0)
                n_pred.append(len(res.suggestions))
                for tol, fraction in RADII.items():
                    pr = class_pr(
                        res.suggestions,
                        truth,
                        class_name=cls,
                        max_distance_l0=fraction * size,
                        score=lambda s: float(s.similarity),
                    )
                    scores[tol].append((pr.n_tp / pr.n_true, pr.ap))
            row: dict[str, Any] = {
                "case": name,
                "mode": mode,
                "objects": len(test.objects),
                "object_px": size,
                "suggestions": float(np.mean(n_pred)),
                "seconds_first": secs[0],
                "seconds_query": float(np.mean(secs[1:])) if len(secs) > 1 else None,
            }
            for tol, fraction in RADII.items():
                rec = [v[0] for v in scores[tol]]
                aps = [v[1] for v in scores[tol]]
                row[tol] = {
                    "radius_px": fraction * size,
                    "recall": float(np.mean(rec)),
                    "recall_min": float(np.min(rec)),
                    "pr_auc": float(np.mean(aps)),
                    "pr_auc_min": float(np.min(aps)),
                }
            rows.append(row)
            print(
                f"{name:>20} {mode:>10}: {row['objects']} objects, {row['suggestions']:.0f} "
                "suggestions, "
                + ", ".join(
                    f"{tol}: recall {row[tol]['recall']:.3f} PR-AUC {row[tol]['pr_auc']:.3f}"
                    for tol in RADII
                )
                + f", {secs[0]:.1f} s",
                flush=True,
            )
            if args.predict and mode == "dense":
                t0 = time.perf_counter()
                pred = _predict_scores(
                    search, review, test, truth, size=size, seed=k, before=args.predict_before
                )
                for rule, by_tol in pred.items():
                    prow: dict[str, Any] = {
                        "case": name,
                        "mode": f"predict, {rule}",
                        "objects": len(test.objects),
                        "object_px": size,
                        "suggestions": float(next(iter(by_tol.values()))[2]),
                        "seconds_first": time.perf_counter() - t0,
                        "seconds_query": None,
                    }
                    for tol, (rec, ap, _) in by_tol.items():
                        prow[tol] = {
                            "radius_px": RADII[tol] * size,
                            "recall": rec,
                            "recall_min": rec,
                            "pr_auc": ap,
                            "pr_auc_min": ap,
                        }
                    rows.append(prow)
                    print(f"{name:>20} {prow['mode']}: {by_tol}", flush=True)
    record = {
        "size": args.size,
        "prototypes": args.prototypes,
        "repeats": args.repeats,
        "tune": args.tune,
        "torch": torch.__version__,
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    lines = [
        "| case | mode | objects | suggestions | "
        + " | ".join(f"recall, {t} (min) | PR-AUC, {t} (min)" for t in RADII)
        + " | s (first query) |",
        "|---|---|---|---|" + "---|---|" * len(RADII) + "---|",
    ]
    for r in rows:
        cells = " | ".join(
            f"{r[t]['recall']:.3f} ({r[t]['recall_min']:.3f}) | "
            f"{r[t]['pr_auc']:.3f} ({r[t]['pr_auc_min']:.3f})"
            for t in RADII
        )
        lines.append(
            f"| {r['case']} | {r['mode']} | {r['objects']} | {r['suggestions']:.0f} | {cells} | "
            f"{r['seconds_first']:.0f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
