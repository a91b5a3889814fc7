"""The training study (issue 27): does the model the loop trains beat the search it started
from, and which head should the loop keep?

For each case (a seeded synthetic benchmark: review slide(s), an unlabelled slide for
self-learning, held-out test slide(s)), the simulated user reviews once (P prototypes per
class, flags N wrong suggestions per class, confirms background), and every arm is scored on
the held-out test slides with the paper's matching, all in one run:

* ``search``: the similarity search alone (suggestions ranked by cosine similarity);
* ``probe``: the search probe (``head_input=search``; :mod:`simsearch_wsi.search.probe`), on
  prototypes only / + approved / + flagged negatives (the label ablation);
* ``trunk``: the paper's fine-tuned trunk (``head_input=trunk``), the preset's stages,
  float32 and, where the CPU has native bf16, bf16 autocast;
* ``auto``: the loop's default (both trained, the better on held-out patches kept);
* ``ensemble``: the search head and the fp32 trunk, each alone and combined: ``x`` the mean of
  their log-probabilities per window, renormalised (a product of the two experts); ``+`` the
  same after scaling each model's centred log-probabilities to unit spread over the image;
  all scored here from the same class maps (is a combined model worth building?).

Cases are split into ``dev`` (where defaults were chosen) and ``held-out`` (never looked at while
choosing). Run::

    .venv/bin/python benchmarks/training_study.py --out bench_output/training_study

and read ``study.md`` there (docs/evaluation.md has the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simsearch_wsi.eval.ablation import score_model, score_search
from simsearch_wsi.eval.benchmark import Benchmark, synthetic_benchmark
from simsearch_wsi.eval.metrics import class_pr, paper_match_radius_l0, pool_class_pr
from simsearch_wsi.eval.user import UserConfig, simulate_review
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.features.precision import autocast_pays_off
from simsearch_wsi.infer.dense import (
    ClassMaps,
    PatchModel,
    dense_class_maps,
    detect,
)
from simsearch_wsi.io import open_image
from simsearch_wsi.review.data import train_session
from simsearch_wsi.review.session import Session
from simsearch_wsi.search.engine import SearchSettings, SimSearch
from simsearch_wsi.train.choices import parse_head_spec
from simsearch_wsi.train.fit import TrainConfig

#: (name, split, benchmark seed, prototypes per class)
CASES = (
    ("seed11-P5", "dev", 11, 5),
    ("seed11-P2", "dev", 11, 2),
    ("seed23-P5", "held-out", 23, 5),
    ("seed23-P2", "held-out", 23, 2),
    ("seed37-P2", "held-out", 37, 2),
    ("seed41-P3", "held-out", 41, 3),
    # first run 2026-12-07 (issue 27's judge and calibration): never looked at before
    ("seed53-P3", "held-out (new)", 53, 3),
    ("seed59-P2", "held-out (new)", 59, 2),
    # added when the ensemble was built (2026-12-07, later the same day): never looked at
    # before its first run, which compared the defaults with the ensemble
    ("seed61-P2", "held-out (fresh)", 61, 2),
    ("seed67-P3", "held-out (fresh)", 67, 3),
    ("seed71-P5", "held-out (fresh)", 71, 5),
)


def _session_without(session: Session, root: Path, drop: set[str]) -> Session:
    """A copy of ``session`` without the review decisions of kinds ``drop``."""
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(session.root, root)
    copy = Session.open(root)
    for rid, (decision, _) in list(copy.decisions.items()):
        if decision in drop:
            del copy.decisions[rid]
    copy.save()
    return copy


def _mean(scores: list[Any]) -> float:
    return float(np.nanmean([s.ap for s in scores]))


def _logits(m: ClassMaps, equal_spread: bool) -> Any:
    """(K, Hp, Wp) float64 log-probabilities of ``m``; with ``equal_spread`` centred over the
    classes and divided by their standard deviation over the image's windows (so a saturated,
    overconfident model does not outvote a calibrated one)."""
    logp = np.log(np.maximum(m.probabilities.astype(np.float64), 1e-300))
    if not equal_spread:
        return logp
    z = logp - np.nanmean(logp, axis=0, keepdims=True)
    return z / max(float(np.nanstd(z)), 1e-12)


def _product_of_experts(maps: list[ClassMaps], *, equal_spread: bool = False) -> ClassMaps:
    """One set of class maps from several models' maps of the same windows: the mean of the
    log-probabilities, renormalised over the classes (NaN where any model has no value)."""
    logp = np.mean([_logits(m, equal_spread) for m in maps], axis=0)
    logp -= np.logaddexp.reduce(logp, axis=0, keepdims=True)
    probs = np.exp(logp).astype(np.float32)
    probs[:, ~np.isfinite(np.stack([m.probabilities for m in maps])).all(axis=(0, 1))] = np.nan
    return dataclasses.replace(maps[0], probabilities=probs)


def _score_maps(bench: Benchmark, maps: list[ClassMaps], radius: float) -> dict[str, float]:
    """PR-AUC per class of ``detect``'s detections on each test image's maps, ranked by
    log-odds (what ``score_model`` does, without segmentation)."""
    parts: dict[str, list[Any]] = {c: [] for c in bench.classes}
    for t, m in zip(bench.test, maps, strict=True):
        found = detect(m, dict.fromkeys(m.classes, 0.0))
        for c in bench.classes:
            parts[c].append(
                class_pr(
                    found,
                    t.truth,
                    class_name=c,
                    max_distance_l0=radius,
                    score=lambda d: float(d.score),
                )
            )
    return {c: pool_class_pr(parts[c]).ap for c in bench.classes}


def _ensemble_rows(
    bench: Benchmark,
    models: dict[str, PatchModel],
    radius: float,
    pairs: list[tuple[str, str]],
) -> dict[str, dict[str, Any]]:
    """Each model alone and each pair combined (``x`` and ``+``), scored from the same maps."""
    per_model: dict[str, list[ClassMaps]] = {}
    for label, model in models.items():
        per_model[label] = []
        for t in bench.test:
            with open_image(t.path) as image:
                per_model[label].append(dense_class_maps(image, model))
    combos = dict(per_model)
    for a, b in pairs:
        if per_model[a][0].probabilities.shape != per_model[b][0].probabilities.shape:
            continue
        for tag, equal in ((" x ", False), (" + ", True)):
            combos[a + tag + b] = [
                _product_of_experts([ma, mb], equal_spread=equal)
                for ma, mb in zip(per_model[a], per_model[b], strict=True)
            ]
    rows = {}
    for label, maps in combos.items():
        ap = _score_maps(bench, maps, radius)
        rows[label] = {"ap": ap, "mean": float(np.nanmean(list(ap.values())))}
    return rows


def run_case(
    name: str,
    split: str,
    bench: Benchmark,
    search: SimSearch,
    out: Path,
    *,
    prototypes: int,
    preset: str,
    arms: list[str],
    seed: int,
    spacings: tuple[float, ...] = (1.0,),
) -> dict[str, Any]:
    radius = paper_match_radius_l0(bench.patch_size_l0)
    if (out / name).exists():
        shutil.rmtree(out / name)
    session = Session.create(out / name / "session")
    outcome = simulate_review(
        search,
        session,
        images=bench.review,
        classes=bench.classes,
        config=UserConfig(prototypes, 5, 8),
        patch_size_l0=bench.patch_size_l0,
        radius_l0=radius,
        rng=np.random.default_rng(seed),
        open_image=open_image,
    )
    row: dict[str, Any] = {"case": name, "split": split, "review": outcome.to_dict(), "arms": {}}
    t0 = time.perf_counter()
    scores = score_search(
        search, bench, prototypes=session.all_prototypes(), open_image=open_image, radius_l0=radius
    )
    row["arms"]["search"] = {
        "ap": {s.class_name: s.ap for s in scores},
        "mean": _mean(scores),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    bf16_native = autocast_pays_off(torch.device("cpu"))
    variants: list[tuple[str, dict[str, Any], set[str]]] = []
    search_head = {"head_input": "search"}
    for arm_spec in arms:
        # ``ARM:uN``: the arm's search heads calibrated on N unlabelled windows as well;
        # ``ARM:jN``: auto's heads compared with N unlabelled windows as background
        arm, extra_config = parse_head_spec(arm_spec)
        suffixes = arm_spec.split(":")[1:]
        first = len(variants)
        if arm == "probe":
            variants += [("probe", search_head, set())]
        elif arm == "probe-labels":
            variants += [
                ("probe: prototypes only", search_head, {"positive", "negative", "background"}),
                ("probe: + approved", search_head, {"negative", "background"}),
                ("probe: + approved + flagged", search_head, {"background"}),
            ]
        elif arm in ("trunk", "trunk-fp32"):
            variants += [("trunk fp32", {"head_input": "trunk", "autocast": False}, set())]
            if bf16_native and arm == "trunk":
                variants += [("trunk bf16", {"head_input": "trunk", "autocast": True}, set())]
        elif arm == "trunk-linear-negatives":
            # the linear head with the rejected suggestions' loss at these weights (0 = off)
            for weight in (0.0, 0.1, 0.3):
                variants += [
                    (
                        f"trunk fp32, negatives x{weight:g}",
                        {"head_input": "trunk", "autocast": False, "linear_negatives": weight},
                        set(),
                    )
                ]
        elif arm in ("tuned", "tuned-fp32"):
            variants += [
                ("tuned-search fp32", {"head_input": "tuned-search", "autocast": False}, set())
            ]
            if bf16_native and arm == "tuned":
                variants += [
                    ("tuned-search bf16", {"head_input": "tuned-search", "autocast": True}, set())
                ]
        elif arm in ("pair", "pair-fp32"):
            # the product's ensemble (``--head-input ensemble``): both search heads in one bundle
            variants += [("ensemble fp32", {"head_input": "ensemble", "autocast": False}, set())]
            if bf16_native and arm == "pair":
                variants += [("ensemble bf16", {"head_input": "ensemble", "autocast": True}, set())]
        elif arm == "trunk-frozen":
            # the linear head on the untrained trunk's pooled features (no self-learning, no
            # supervised contrastive stage): does fine-tuning the trunk help or distort?
            base = TrainConfig.preset_config(preset)
            variants += [
                (
                    "trunk fp32, frozen (linear head only)",
                    {
                        "head_input": "trunk",
                        "autocast": False,
                        "strategy": "pos",
                        "supcon": dataclasses.replace(base.supcon, epochs=0),
                    },
                    set(),
                )
            ]
        elif arm == "auto":
            variants += [("auto", {"head_input": "auto", "autocast": True}, set())]
        elif arm == "auto-fp32":
            # fp32 and the same seed: the model it keeps is the trunk fp32 or tuned-search fp32
            # arm's model, bit for bit
            variants += [("auto fp32", {"head_input": "auto", "autocast": False}, set())]
        if extra_config:
            variants[first:] = [
                (f"{label}, {', '.join(suffixes)}", {**changes, **extra_config}, drop)
                for label, changes, drop in variants[first:]
            ]
    if "ensemble" in arms:
        models = {}
        for label, changes in (
            ("probe", {"head_input": "search"}),
            ("trunk fp32", {"head_input": "trunk", "autocast": False}),
            # the same trunk training (same seed), then the search head on its vectors
            ("tuned probe", {"head_input": "tuned-search", "autocast": False}),
        ):
            config = TrainConfig.preset_config(preset).replace(**changes)
            trained = train_session(
                session,
                search,
                config=config,
                open_image=open_image,
                noisy_images=bench.unlabelled,
                seed=seed,
            )
            models[label] = PatchModel(trained.bundle, cache_dir=search.cache.root)
        pairs = [("probe", "trunk fp32"), ("tuned probe", "trunk fp32"), ("tuned probe", "probe")]
        for label, scored in _ensemble_rows(bench, models, radius, pairs).items():
            row["arms"][f"ensemble: {label}"] = scored
            print(f"{name}: ensemble: {label}: {scored['mean']:.3f}", flush=True)
    for label, changes, drop in variants:
        sess = (
            _session_without(session, out / name / f"session-{len(row['arms'])}", drop)
            if drop
            else session
        )
        config = TrainConfig.preset_config(preset).replace(**changes)
        t0 = time.perf_counter()
        trained = train_session(
            sess,
            search,
            config=config,
            open_image=open_image,
            noisy_images=bench.unlabelled,
            seed=seed,
        )
        t1 = time.perf_counter()
        bundle = trained.bundle
        model = PatchModel(bundle, cache_dir=search.cache.root)
        for spacing in spacings[1:]:
            other = score_model(
                model, bench, open_image=open_image, radius_l0=radius, spacing_patches=spacing
            )
            row["arms"][f"{label}, spacing {spacing:g}"] = {
                "ap": {s.class_name: s.ap for s in other},
                "f1": {s.class_name: s.f1 for s in other},
                "iou": {s.class_name: s.iou for s in other},
                "mean": _mean(other),
            }
        scores = score_model(
            model, bench, open_image=open_image, radius_l0=radius, spacing_patches=spacings[0]
        )
        row["arms"][label] = {
            "ap": {s.class_name: s.ap for s in scores},
            "f1": {s.class_name: s.f1 for s in scores},
            "iou": {s.class_name: s.iou for s in scores},
            "thresholds": dict(bundle.thresholds),
            "mean": _mean(scores),
            "kept": bundle.head_input,
            "selection": trained.metrics.get("selection", {}).get("reason"),
            "seconds_train": round(t1 - t0, 1),
            "seconds_score": round(time.perf_counter() - t1, 1),
        }
        a = row["arms"][label]
        print(
            f"{name}: {label}: {a['mean']:.3f} (search {row['arms']['search']['mean']:.3f})"
            f"; at thresholds F1 {_avg(a['f1']):.3f}, IoU {_avg(a['iou']):.3f}",
            flush=True,
        )
    return row


def _avg(values: dict[str, float]) -> float:
    finite = [v for v in values.values() if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def write_report(rows: list[dict[str, Any]], out: Path, header: str) -> str:
    arms: list[str] = list(dict.fromkeys(a for r in rows for a in r["arms"]))
    lines = [
        header,
        "",
        "| case | split | " + " | ".join(arms) + " |",
        "|---|---|" + "---|" * len(arms),
    ]
    for r in rows:
        cells = []
        for a in arms:
            v = r["arms"].get(a)
            cells.append("" if v is None else f"{v['mean']:.3f}")
        lines.append(f"| {r['case']} | {r['split']} | " + " | ".join(cells) + " |")
    for split in ("dev", "held-out", "held-out (new)"):
        sub = [r for r in rows if r["split"] == split]
        if sub:
            means = [
                f"{np.nanmean([r['arms'][a]['mean'] for r in sub if a in r['arms']]):.3f}"
                if any(a in r["arms"] for r in sub)
                else ""
                for a in arms
            ]
            lines.append(f"| **mean {split}** | | " + " | ".join(means) + " |")
    thresholded = [a for a in arms if any("f1" in r["arms"].get(a, {}) for r in rows)]
    if thresholded:
        lines += [
            "",
            "At each model's own thresholds (what `predict` writes): detection F1 / "
            "segmentation IoU, class means:",
            "",
            "| case | split | " + " | ".join(thresholded) + " |",
            "|---|---|" + "---|" * len(thresholded),
        ]
        for r in rows:
            cells = [
                f"{_avg(r['arms'][a]['f1']):.2f} / {_avg(r['arms'][a]['iou']):.2f}"
                if a in r["arms"]
                else ""
                for a in thresholded
            ]
            lines.append(f"| {r['case']} | {r['split']} | " + " | ".join(cells) + " |")
    lines += ["", "Per class (every case):", ""]
    for r in rows:
        per = "; ".join(
            f"{a}: " + ", ".join(f"{c} {v:.2f}" for c, v in r["arms"][a]["ap"].items())
            for a in arms
            if a in r["arms"]
        )
        lines.append(f"- {r['case']}: {per}")
    text = "\n".join(lines) + "\n"
    (out / "study.md").write_text(text, encoding="utf-8")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_output/training_study"))
    parser.add_argument("--cases", default=",".join(c[0] for c in CASES))
    parser.add_argument(
        "--arms",
        default="probe,trunk,auto",
        help="comma list of probe, probe-labels, trunk, tuned, pair (the product's "
        "--head-input ensemble), trunk-frozen, trunk-linear-negatives, auto, ensemble (ad hoc "
        "combinations of separately trained heads); ARM-fp32 = fp32 only",
    )
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--weights", default="embedded")
    parser.add_argument("--size", default="2048x1536", help="slide size WxH")
    parser.add_argument(
        "--spacings",
        default="1",
        help="detection spacings (patch widths) to score every model at, the first as the "
        "arm's own row (default: 1)",
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    trunk, spec, info = build_trunk("resnet18-l3", args.weights, seed=0)
    extractor = FeatureExtractor(trunk, spec, info, device=torch.device("cpu"))
    # the patch rule, the search default when docs/evaluation.md's training-study tables were run
    # (the simulated review and the search arm use it); the object rule is the default since
    # issue 18
    search = SimSearch(extractor, FeatureCache(out / "cache"), settings=SearchSettings(dense=False))
    w, h = (int(v) for v in args.size.split("x"))
    wanted = set(args.cases.split(","))
    rows = []
    t0 = time.perf_counter()
    for name, split, seed, p in CASES:
        if name not in wanted:
            continue
        bench = synthetic_benchmark(
            out / f"bench-seed{seed}",
            seed=seed,
            n_review=1,
            n_unlabelled=1,
            n_test=1,
            size=(w, h),
            n_per_class=10,
        )
        rows.append(
            run_case(
                name,
                split,
                bench,
                search,
                out,
                prototypes=p,
                preset=args.preset,
                arms=args.arms.split(","),
                seed=0,
                spacings=tuple(float(v) for v in args.spacings.split(",")),
            )
        )
        (out / "rows.json").write_text(json.dumps(rows, indent=1))
    header = (
        f"Training study: `benchmarks/training_study.py --arms {args.arms} --preset "
        f"{args.preset} --weights {args.weights} --size {args.size}`; {info.description}; "
        f"torch threads {torch.get_num_threads()}; total {time.perf_counter() - t0:.0f} s. "
        "Mean PR-AUC over the 3 classes on the held-out test slide."
    )
    print(write_report(rows, out, header))


if __name__ == "__main__":
    main()
