"""Few labels: what each head does with the smallest review the loop accepts (issue 27).

The training study (``benchmarks/training_study.py``) reviews like a user who approves and
flags a dozen suggestions per class. This script is the other end, the setting of the test
suite's acceptance tests: three small synthetic slides (1024 x 768, 6 ring / cluster / stripes
motifs each), a session labelled from the truth of slide 0 with 1 prototype and 2 approved
suggestions per class, 1 rejected suggestion per class and 3 confirmed background patches,
the ``fast`` preset, slide 2 as the unreviewed slide for self-learning, slide 1 held out.
Each head is scored on slide 1 at its own thresholds (what ``predict`` writes): detection F1
with the paper's matching (3 strides of 0.1 patch), segmentation IoU against the rasterised
boxes, and the segmented area over the true boxes' area; and, threshold-free, its PR-AUC
(every local maximum of a class's log-odds, as ``score_model``) next to the search alone's
from the session's prototypes, in the same run. A head written ``NAME:uN`` calibrates a search
head on N unlabelled windows of the reviewed slide (``TrainConfig.unlabelled_windows``),
``NAME:jN`` gives ``auto`` N unlabelled windows to compare heads on (``judge_windows``).
``--scenes`` picks other slide triples (scene s: slides of seeds 3s, 3s+1, 3s+2; scene 0 is
the test suite's). Run::

    .venv/bin/python benchmarks/few_labels.py --out bench_output/few_labels \
        --heads trunk,tuned-search --weights embedded --threads 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simsearch_wsi.eval.metrics import class_pr
from simsearch_wsi.eval.thresholded import detection_scores, rasterize_objects, segmentation_iou
from simsearch_wsi.eval.truth import truth_from_synthetic
from simsearch_wsi.eval.user import NO_THRESHOLD
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.infer.dense import PatchModel, dense_class_maps, detect, segment
from simsearch_wsi.io import open_image
from simsearch_wsi.review.data import train_session
from simsearch_wsi.review.session import Session
from simsearch_wsi.review.simulate import label_from_truth
from simsearch_wsi.search.engine import SearchSettings, SimSearch
from simsearch_wsi.synthetic import make_synthetic_slide
from simsearch_wsi.train.choices import parse_head_spec
from simsearch_wsi.train.fit import TrainConfig

MOTIFS = ("ring", "cluster", "stripes")


def run_head(
    head: str, slides: Any, *, root: Path, weights: str, preset: str, seed: int, background: int
) -> dict[str, Any]:
    """Train ``head`` on slide 0's labels and score it on slide 1 (module docstring)."""
    label = head
    head, extra = parse_head_spec(label)
    session_dir = root / f"session-{label.replace(':', '-')}-{seed}-bg{background}"
    shutil.rmtree(session_dir, ignore_errors=True)
    session = label_from_truth(Session.create(session_dir), slides[0], background=background)
    trunk, spec, info = build_trunk("resnet18-l3", weights, seed=0)
    # the patch rule: the search default when docs/evaluation.md's few-label tables were run
    search = SimSearch(
        FeatureExtractor(trunk, spec, info),
        FeatureCache(root / f"cache-{weights}"),
        settings=SearchSettings(dense=False),
    )
    t0 = time.perf_counter()
    result = train_session(
        session,
        search,
        config=TrainConfig.preset_config(preset).replace(head_input=head, **extra),
        open_image=open_image,
        noisy_images=[slides[2].path],
        seed=seed,
    )
    seconds = time.perf_counter() - t0
    bundle = result.bundle
    slide = slides[1]
    with open_image(slide.path) as image:
        maps = dense_class_maps(image, PatchModel(bundle))
    detections = detect(maps, bundle.thresholds)
    seg = segment(maps, bundle.thresholds)
    radius_l0 = 3 * 0.1 * bundle.patch_size_l0[0]
    truth_1 = truth_from_synthetic(slide)
    every = detect(maps, dict.fromkeys(bundle.classes, 0.0))
    pr_auc = {
        c: class_pr(every, truth_1, class_name=c, max_distance_l0=radius_l0, score=_score).ap
        for c in MOTIFS
    }
    with open_image(slide.path) as image:
        suggested = search.suggest(
            image,
            session.all_prototypes(),
            thresholds=dict.fromkeys(MOTIFS, NO_THRESHOLD),
            patch_size_l0=session.patch_size_l0,
        ).suggestions
    search_pr_auc = {
        c: class_pr(
            suggested, truth_1, class_name=c, max_distance_l0=radius_l0, score=_similarity
        ).ap
        for c in MOTIFS
    }
    scores = detection_scores(detections, slide.objects, classes=MOTIFS, max_distance_l0=radius_l0)
    truth = rasterize_objects(
        slide.objects, classes=seg.classes, shape=seg.labels.shape, downsample=seg.downsample
    )
    iou = segmentation_iou(seg.labels, truth, classes=seg.classes)
    area_ratio = {
        c: float((seg.labels == k).sum()) / max(float((truth == k).sum()), 1.0)
        for k, c in enumerate(seg.classes, start=1)
        if c in MOTIFS
    }
    return {
        "head": label,
        "kept": bundle.head_input,
        "selection": bundle.metrics.get("selection", {}).get("reason"),
        "pr_auc": pr_auc,
        "search_pr_auc": search_pr_auc,
        "seed": seed,
        "f1": {c: scores[c].f1 for c in MOTIFS},
        "recall": {c: scores[c].recall for c in MOTIFS},
        "precision": {c: scores[c].precision for c in MOTIFS},
        "iou": {c: iou[c] for c in MOTIFS},
        "area_ratio": area_ratio,
        "thresholds": dict(bundle.thresholds),
        "seconds_train": round(seconds, 1),
    }


def _score(d: Any) -> float:
    return float(d.score)


def _similarity(s: Any) -> float:
    return float(s.similarity)


def _fmt(d: dict[str, float]) -> str:
    return " / ".join(f"{d[c]:.2f}" for c in MOTIFS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_output/few_labels"))
    parser.add_argument("--heads", default="trunk,tuned-search")
    parser.add_argument("--weights", default="embedded")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--seeds", default="0")
    parser.add_argument(
        "--background", type=int, default=3, help="confirmed background patches (default: 3)"
    )
    parser.add_argument("--scenes", default="0", help="slide triples (module docstring)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for scene, seed in (
        (int(sc), int(s)) for sc in args.scenes.split(",") for s in args.seeds.split(",")
    ):
        slides = tuple(
            make_synthetic_slide(
                args.out / f"small{s}.tiff", seed=s, width=1024, height=768, n_per_class=6
            )
            for s in (3 * scene, 3 * scene + 1, 3 * scene + 2)
        )
        for head in args.heads.split(","):
            row = run_head(
                head,
                slides,
                root=args.out,
                weights=args.weights,
                preset=args.preset,
                seed=seed,
                background=args.background,
            )
            row["scene"] = scene
            rows.append(row)
            print(
                f"{head} (scene {scene}, seed {seed}): PR-AUC {_fmt(row['pr_auc'])} (search "
                f"{_fmt(row['search_pr_auc'])}), F1 {_fmt(row['f1'])}, IoU {_fmt(row['iou'])}, "
                f"area/true {_fmt(row['area_ratio'])}",
                flush=True,
            )
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    lines = [
        f"weights {args.weights}, preset {args.preset}, {args.background} confirmed background "
        "patches; ring / cluster / stripes",
        "",
        "| head | scene | seed | PR-AUC | search PR-AUC | detection F1 | recall | "
        "segmentation IoU | area / true area |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['head']} | {r['scene']} | {r['seed']} | {_fmt(r['pr_auc'])} | "
            f"{_fmt(r['search_pr_auc'])} | {_fmt(r['f1'])} | {_fmt(r['recall'])} | "
            f"{_fmt(r['iou'])} | {_fmt(r['area_ratio'])} |"
        )
    heads = list(dict.fromkeys(r["head"] for r in rows))

    def mean_of(h: str, key: str) -> float:
        return float(np.mean([np.nanmean(list(r[key].values())) for r in rows if r["head"] == h]))

    lines += [
        "",
        "Mean F1: " + ", ".join(f"{h} {mean_of(h, 'f1'):.2f}" for h in heads),
        "Mean PR-AUC: "
        + ", ".join(f"{h} {mean_of(h, 'pr_auc'):.3f}" for h in heads)
        + f" (search {mean_of(heads[0], 'search_pr_auc'):.3f})",
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "few_labels.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
