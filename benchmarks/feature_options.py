"""Which features make the similarity search work offline? PR-AUC of suggestions from a few
prototypes, per feature option (trunk weights x feature normalisation), side by side in one run.

Benchmarks (the same prototype draws for every option; :mod:`simsearch_wsi.eval.search_quality`):

* **synthetic**: the evaluation harness's synthetic H&E benchmark (seed 0: varied motifs on
  mottled tissue, look-alike distractors, stain jitter between slides); P prototypes per class
  from the review slides, PR-AUC on the two held-out test slides, ``--repeats`` draws.
* **IHC**: scikit-image's real IHC sample with the colour-rule pseudo-truth
  (:mod:`simsearch_wsi.eval.derived`; Epithelium = DAB-rich, Stroma = nuclei away from DAB):
  precision of the 25 most similar suggestions per class from 3 prototypes inside each region.

Weights: ``random`` (seeded), ``embedded`` (the package's default trunk), ``imagenet`` (only
when torchvision's file is in the torch cache; never downloaded here), ``own`` (``pretrain`` on
the synthetic benchmark's own slides with the embedded trunk's recipe, written under --out the
first time; needs about as long as that recipe) and any ``LABEL=PATH`` given with --weights-file.

    .venv/bin/python benchmarks/feature_options.py --out bench_output/feature_options
    .venv/bin/python benchmarks/feature_options.py --out ... --own-pretrain --repeats 10
    .venv/bin/python benchmarks/feature_options.py --out ... --weights embedded \
        --norms whiten --whiten-shrinkage 0.1,0.3,1,3 --repeats 5        # the shrinkage scan

Writes ``results.json`` and ``results.md`` under --out. Results: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simsearch_wsi.eval.benchmark import synthetic_benchmark
from simsearch_wsi.eval.derived import IHC_CLASSES, ihc_pseudo_truth
from simsearch_wsi.eval.search_quality import object_search_quality, region_search_quality
from simsearch_wsi.eval.user import TruthImage
from simsearch_wsi.features import norm as featurenorm
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.features.norm import FEATURE_NORMS
from simsearch_wsi.io import open_image
from simsearch_wsi.search.engine import SearchSettings, SimSearch

IHC_MPP = 0.5
IHC_PATCH_PX = 48.0


def _ihc_image(root: Path) -> TruthImage:
    from skimage import data

    from simsearch_wsi.io.tiff_writer import write_pyramidal_tiff

    rgb = np.asarray(data.immunohistochemistry())
    path = root / "skimage_ihc.tiff"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        write_pyramidal_tiff(path, rgb, mpp=None, n_levels=2)
    return TruthImage(path, ihc_pseudo_truth(rgb, source="IHC colour rule"), IHC_MPP)


def _own_pretrain(out: Path, slides: list[Path], device: str, epochs: int | None) -> Path:
    """``pretrain`` on the benchmark's slides with the embedded trunk's recipe."""
    import train_embedded_trunk as recipe  # benchmarks/ is on sys.path when run as a script

    from simsearch_wsi.features.backbones import embedded_weights_path, get_backbone_spec

    meta = json.loads(
        torch.load(
            embedded_weights_path(get_backbone_spec("resnet18-l3")),
            map_location="cpu",
            weights_only=True,
        )["simsearch_wsi"]
    )
    objective = str(meta.get("objective", "simclr"))
    n_epochs = epochs or int(meta["config"]["stage"]["epochs"])
    path = out / f"own-{objective}-e{n_epochs}.pth"
    if not path.is_file():
        from simsearch_wsi.cli.main import main as cli_main

        argv = recipe.pretrain_args(
            slides, path, objective=objective, epochs=n_epochs, cache=out / "cache", device=device
        )
        if cli_main(argv):
            raise SystemExit("own pretraining failed")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_output/feature_options"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prototypes", type=int, default=5, help="P per class (synthetic)")
    parser.add_argument("--weights", default="random,embedded,imagenet", help="comma list")
    parser.add_argument("--weights-file", action="append", default=[], metavar="LABEL=PATH")
    parser.add_argument("--norms", default=",".join(FEATURE_NORMS))
    parser.add_argument(
        "--whiten-shrinkage",
        default=None,
        help="comma list of ZCA shrinkages to scan for 'whiten' (default: the package's)",
    )
    parser.add_argument("--own-pretrain", action="store_true", help="add the 'own' weights")
    parser.add_argument("--own-epochs", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    bench = synthetic_benchmark(out / "synthetic", seed=0)
    ihc = _ihc_image(out / "ihc")
    weights: list[tuple[str, str]] = [(w, w) for w in args.weights.split(",") if w]
    weights += [tuple(item.split("=", 1)) for item in args.weights_file]  # type: ignore[misc]
    if args.own_pretrain:
        slides = (
            [t.path for t in bench.review] + list(bench.unlabelled) + [t.path for t in bench.test]
        )
        weights.append(("own", str(_own_pretrain(out, slides, args.device, args.own_epochs))))
    hub = Path(torch.hub.get_dir())
    rows: list[dict[str, Any]] = []
    for label, spec in weights:
        try:
            trunk, bspec, info = build_trunk("resnet18-l3", spec, seed=0, cache_dir=hub)
        except Exception as exc:  # e.g. ImageNet not cached: say so in the table
            rows.append({"weights": label, "skipped": f"{type(exc).__name__}: {exc}"})
            print(f"{label}: skipped ({exc})", flush=True)
            continue
        extractor = FeatureExtractor(trunk, bspec, info, device=torch.device(args.device))
        cache = FeatureCache(out / "cache")
        shrinkages = (
            [float(v) for v in args.whiten_shrinkage.split(",")]
            if args.whiten_shrinkage
            else [featurenorm.WHITEN_SHRINKAGE]
        )
        runs = [
            (norm, shrink)
            for norm in args.norms.split(",")
            for shrink in (shrinkages if norm == "whiten" else [None])
        ]
        for norm, shrink in runs:
            if shrink is not None:
                featurenorm.WHITEN_SHRINKAGE = shrink  # the module's knob (cache files keyed on it)
            # the patch rule: the search default when docs/evaluation.md's tables were run
            settings = SearchSettings(feature_norm=norm, dense=False)
            search = SimSearch(extractor, cache, settings=settings)
            t0 = time.perf_counter()
            synth = object_search_quality(
                search,
                bench,
                open_image=open_image,
                prototypes_per_class=args.prototypes,
                repeats=args.repeats,
            )
            region = region_search_quality(
                search,
                ihc,
                classes=IHC_CLASSES,
                open_image=partial(open_image, mpp=IHC_MPP),
                patch_size_l0=IHC_PATCH_PX,
                repeats=args.repeats,
            )
            row = {
                "weights": label,
                "weights_description": info.description,
                "feature_norm": norm if shrink is None else f"whiten (shrinkage {shrink:g})",
                "synthetic": synth.to_dict(),
                "ihc": region.to_dict(),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            per_class = " ".join(f"{c} {synth.class_mean(c):.3f}" for c in bench.classes)
            print(
                f"{label:>10} {row['feature_norm']:>11}: synthetic PR-AUC {synth.mean:.3f} "
                f"+- {synth.std:.3f} "
                f"({per_class}) | IHC precision@25 {region.mean:.3f} | {row['seconds']} s",
                flush=True,
            )
    record = {
        "benchmark": bench.name,
        "prototypes_per_class": args.prototypes,
        "repeats": args.repeats,
        "device": args.device,
        "torch": torch.__version__,
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    lines = [
        "| weights | feature norm | synthetic PR-AUC (mean +- sd over draws) | "
        + " | ".join(bench.classes)
        + " | IHC precision@25 |",
        "|---|---|---|" + "---|" * len(bench.classes) + "---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['weights']} | skipped: {r['skipped'][:80]} |")
            continue
        s = r["synthetic"]
        cls = " | ".join(f"{s['per_class_mean'][c]:.3f}" for c in bench.classes)
        lines.append(
            f"| {r['weights']} | {r['feature_norm']} | {s['mean']:.3f} +- "
            f"{s['std_over_repeats']:.3f} | {cls} | {r['ihc']['mean']:.3f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
