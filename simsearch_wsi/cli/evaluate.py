"""``evaluate``: score the method with a simulated user (the SimSearch paper's ablation) on the
synthetic benchmark or a manifest of images with ground truth."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simsearch_wsi.cli.argtypes import int_at_least, positive_float
from simsearch_wsi.cli.console import progress, rich_console
from simsearch_wsi.cli.engine import build_search
from simsearch_wsi.cli.exitcodes import EXIT_OK
from simsearch_wsi.cli.inputs import guard
from simsearch_wsi.cli.options import PATCH_SIZE_PX, PRESET, SEED
from simsearch_wsi.core.pathguard import Named, naming_output

if TYPE_CHECKING:
    from simsearch_wsi.cli.options import Subparsers

#: what ``evaluate`` writes into ``--out``
_REPORT_FILES = ("runs.csv", "summary.csv", "summary.md", "pr_auc.png", "evaluation.json")


def register(sub: Subparsers, engine: argparse.ArgumentParser) -> None:
    """Add ``evaluate`` to the commands."""
    p_eval = sub.add_parser(
        "evaluate",
        parents=[engine],
        help="score the method with a simulated user (the paper's ablation)",
        description="Play the user of the SimSearch paper on images with ground truth: P random "
        "prototypes per class, the similarity threshold lowered until N wrong suggestions are "
        "flagged, the rest approved; train each strategy and score PR-AUC per class (and IoU "
        "where the truth is a mask) on held-out images, over repeats. Writes runs.csv, "
        "summary.csv, summary.md and pr_auc.png; finished runs are reused on a re-run.",
    )
    src = p_eval.add_mutually_exclusive_group()
    src.add_argument(
        "--synthetic",
        action="store_true",
        help="generate the synthetic benchmark (default when no --benchmark is given)",
    )
    src.add_argument(
        "--benchmark",
        metavar="MANIFEST.csv",
        default=None,
        help="CSV with image, role (review, unlabelled, test), truth (CSV, GeoJSON or label "
        "mask) and optional mpp columns",
    )
    p_eval.add_argument("--out", required=True, metavar="DIR", help="folder for the results")
    p_eval.add_argument(
        "--strategies",
        default="search,pos,pos+neg,pos+selflearn,pos+neg+selflearn",
        help="comma-separated (default: %(default)s); search = the similarity search alone",
    )
    p_eval.add_argument(
        "--prototypes",
        nargs="+",
        type=int_at_least(1),
        default=[5, 10],
        metavar="P",
        help="prototypes per class (default: 5 10)",
    )
    p_eval.add_argument(
        "--negatives",
        nargs="+",
        type=int_at_least(0),
        default=[0, 5],
        metavar="N",
        help="wrong suggestions flagged per class (default: 0 5)",
    )
    p_eval.add_argument(
        "--repeats", type=int_at_least(1), default=3, help="repeats (default: %(default)s)"
    )
    SEED.add(p_eval)
    PRESET.add(p_eval)
    p_eval.add_argument(
        "--background",
        type=int_at_least(0),
        default=8,
        help="background candidates reviewed per image, each end (default: %(default)s)",
    )
    PATCH_SIZE_PX.add(
        p_eval,
        help="with --benchmark: the prototype square in level-0 pixels (default: %(default)s)",
    )
    p_eval.add_argument(
        "--classes",
        default=None,
        help="with --benchmark: classes scored, in order (label 1, 2, ... of mask truth)",
    )
    p_eval.add_argument(
        "--mask-downsample",
        type=positive_float,
        default=1.0,
        help="with --benchmark: level-0 pixels per pixel of mask truth (default: 1)",
    )
    p_eval.add_argument("--no-resume", action="store_true", help="rerun finished runs too")
    p_eval.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: report the finished runs of OUT (e.g. of a stopped ablation)",
    )
    p_eval.add_argument("--json", action="store_true", help="print the record as JSON")
    p_eval.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import time

    from simsearch_wsi.core.atomic import write_json_atomic
    from simsearch_wsi.eval.ablation import AblationConfig, run_ablation
    from simsearch_wsi.eval.benchmark import read_benchmark_csv, synthetic_benchmark
    from simsearch_wsi.eval.report import summarize, summary_markdown, write_report
    from simsearch_wsi.io import open_image

    out = Path(args.out)
    config = AblationConfig(
        strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
        prototypes=tuple(args.prototypes),
        negatives=tuple(args.negatives),
        repeats=args.repeats,
        seed=args.seed,
        preset=args.preset,
        background=args.background,
    )
    outputs: list[Named] = [("--out", out / name) for name in _REPORT_FILES]
    guard(args, outputs=outputs, inputs=[("benchmark", args.benchmark)], into=[("--out", out)])
    if args.benchmark:
        classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
        benchmark = read_benchmark_csv(
            args.benchmark,
            patch_size_l0=args.patch_size_px,
            classes=classes,
            mask_downsample=args.mask_downsample,
        )
    else:
        benchmark = synthetic_benchmark(out / "data", seed=args.seed)
    if args.benchmark:  # every image and truth file the manifest names
        read: list[Named] = [("benchmark image", p) for p in benchmark.unlabelled]
        for t in (*benchmark.review, *benchmark.test):
            read += [("benchmark image", t.path), ("truth", t.truth.source)]
        guard(args, outputs=outputs, inputs=read, into=[("--out", out)])
    if args.cache is None:  # an evaluation keeps its features with its results
        args.cache = str(out / "feature_cache")
    search = build_search(args)
    mpp = {str(Path(t.path).resolve()): t.mpp for t in (*benchmark.review, *benchmark.test)}

    def opener(path: str | os.PathLike[str]) -> Any:
        return open_image(path, mpp=mpp.get(str(Path(path).resolve())) or args.mpp)

    t0 = time.perf_counter()
    results = []
    with progress() as bars, naming_output("--out", out):
        for result in run_ablation(
            benchmark,
            config,
            search=search,
            out_dir=out,
            open_image=opener,
            device=search.extractor.device,
            resume=not args.no_resume,
            run_missing=not args.report_only,
            progress=bars,
        ):
            results.append(result)
    with naming_output("--out", out):
        files = write_report(results, benchmark.classes, out_dir=out)
    record = {
        "benchmark": benchmark.to_dict(),
        "config": config.to_dict(),
        "weights": search.extractor.weights.description,
        "device": str(search.extractor.device),
        "runs": len(results),
        "reused": sum(r.reused for r in results),
        "seconds": round(time.perf_counter() - t0, 1),
        "files": {k: str(v) for k, v in files.items()},
    }
    with naming_output("--out", out):
        files["record"] = write_json_atomic(out / "evaluation.json", record)
    if args.json:
        print(json.dumps(record, indent=2))
        return EXIT_OK
    console = rich_console()
    console.print(
        f"evaluate: {benchmark.name}, {len(results)} runs ({record['reused']} reused) in "
        f"{record['seconds']} s; weights: {record['weights']}",
        markup=False,
    )
    console.print(summary_markdown(summarize(results, benchmark.classes), benchmark.classes))
    for role, path in files.items():
        console.print(f"  {role:<8} {path}", markup=False)
    return EXIT_OK
