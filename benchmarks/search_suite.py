"""Search quality suite (issue 18): how good are suggestions from a few prototypes, on several
kinds of image, for several search configurations side by side, in one run?

Cases (seeded; except for ``ihc regions`` with true objects, a review image giving the
prototypes and a test image of another seed scored):

* ``motifs``: the harness's synthetic H&E benchmark (:func:`~simsearch_wsi.eval.benchmark.
  synthetic_benchmark`: ring, cluster and stripes motifs of ~48 px with a filled-disc,
  nucleus-doublet and crosshatch look-alike of each, stain jitter), one review and one test
  slide of 1536 x 1024 px, 8 objects per class; prototypes are 48 px squares on the objects.
* ``nuclei``: a 16-bit DAPI/GFP field of crowded nuclei (:func:`~simsearch_wsi.synthetic.dense.
  make_dense_field`, radius ~7 px, centres >= 1.15 diameters apart), 384 x 384 px.
* ``ihc cells``: a brightfield IHC field (:func:`~simsearch_wsi.synthetic.ihc.
  make_ihc_cell_field`, hematoxylin + DAB by Beer-Lambert), classes ``negative`` (nucleus DAB
  OD 0.05) and ``positive`` (0.6), 384 x 384 px.
* ``blood``: brightfield red blood cells that touch (``make_dense_field(kind="blood")``).
* ``plate``: fields of a 2-channel (GFP, DNA) OME-Zarr plate of separate cells, 13-80 px, with
  three phenotypes as classes (:func:`~simsearch_wsi.synthetic.phenotypes.make_phenotype_plate`,
  no pixel size); review = well A1 field 0, test = well A2 fields 0 and 1.
* ``ihc regions``: scikit-image's real IHC sample with the colour-rule pseudo-truth of
  :mod:`simsearch_wsi.eval.derived` (regions, one image: prototypes are 48 px squares inside
  each class's region, the score is the precision of the 25 most similar suggestions per class;
  reported beside the PR-AUC cases, not in their mean).

Except for ``motifs`` and ``ihc regions``, the prototypes are boxes drawn tightly around the
objects (the truth's box; a square of the cell's diameter for IHC and plate cells), as a user
outlines nuclei or cells. P prototypes per class (``--prototypes``, default 1, 2, 5) from the
review image, drawn with ``np.random.default_rng([case seed, P, draw])``: the same draws for
every configuration. Every suggestion on the test images (threshold -1, no cap) is a detection
ranked by similarity; matching as :func:`simsearch_wsi.eval.metrics.class_pr` (rank order,
one-to-one) within the paper's radius, 0.3 x the box the user draws (the motifs' 48 px patch,
else the median true object box of the test image). Per class: PR-AUC and the recall at
precision 0.9 (the highest recall of the curve where precision >= 0.9; 0 when never). Means over
classes, then draws, then P.

Seeds: ``--split dev`` (the default; what configurations may be chosen on) and ``--split
held-out`` (other seeds; run only to report). Configurations: ``--configs`` from
:data:`CONFIGS`; ``default`` is the package's default :class:`SearchSettings` (with the cap
lifted), the baseline row: the object rule (``dense=True``) since issue 18 made it the default,
with object candidates where the prototypes outline separate objects (``candidates="auto"``)
since 2026-12-07 (``grid``: the grid only, the default before);
``patch`` is the patch rule (``dense=False``), the ``default`` row of the tables in
docs/evaluation.md, which were run before.
``objects`` and ``objects-auto`` are the object candidates (``candidates="objects"`` and
``"auto"``, :mod:`simsearch_wsi.search.objects`); ``--objects-set NAME=VALUE,...`` changes that
module's constants for a run (dev ablations), and a configuration named ``NAME@CONST=VALUE;...``
(e.g. ``default@OBJECT_CHANNEL_BLOCKS=0``) is configuration ``NAME`` with those constants set for
its row only (rows side by side in one run). ``--cases plate@SEED`` (dev only; SEED one of
:data:`EXTRA_PLATE_SEEDS`) adds the plate of another generator seed, scored as ``plate``.

    .venv/bin/python benchmarks/search_suite.py --out bench_output/search_suite --threads 1
    .venv/bin/python benchmarks/search_suite.py --out ... --split held-out --threads 1
    .venv/bin/python benchmarks/search_suite.py --out ... --quick     # 1 draw, P = 2 only

Writes ``results-<split>.json`` and ``results-<split>.md`` under --out; the images go to
``<out>/data-<split>``, feature maps to ``<out>/cache`` (the plate, the slowest to embed, is
reused when one with the same parameters and generator is there, so its cache stays valid). Results:
docs/evaluation.md, "Search quality suite (issue 18)".
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.eval.benchmark import synthetic_benchmark
from simsearch_wsi.eval.metrics import ClassPR, class_pr, paper_match_radius_l0, pool_class_pr
from simsearch_wsi.eval.truth import GroundTruth, read_truth_csv
from simsearch_wsi.eval.user import NO_THRESHOLD, TruthImage, square_box
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.io import open_image
from simsearch_wsi.search.engine import SearchSettings, SimSearch
from simsearch_wsi.search.similarity import Prototype

#: precision at which recall is reported
PRECISION_LEVEL = 0.9
NO_CAP = 100_000

#: configuration name -> settings (every one with the per-class cap lifted)
CONFIGS: dict[str, SearchSettings] = {
    # the package's default (the baseline row): the object rule, one pass
    "default": SearchSettings(max_per_class=NO_CAP),
    # the patch rule: the default before issue 18 (the tables' "default" row)
    "patch": SearchSettings(dense=False, max_per_class=NO_CAP),
    "dense": SearchSettings(dense=True, max_per_class=NO_CAP),
    "auto": SearchSettings(dense="auto", max_per_class=NO_CAP),
    "half-spacing": SearchSettings(dense=False, min_distance_fraction=0.5, max_per_class=NO_CAP),
    "dense+expand1": SearchSettings(dense=True, expand=1, max_per_class=NO_CAP),
    "dense+expand3": SearchSettings(dense=True, expand=3, max_per_class=NO_CAP),
    "auto+expand3": SearchSettings(dense="auto", expand=3, max_per_class=NO_CAP),
    # object candidates (2026-12-07): one candidate per object found, compared at its own size
    "objects": SearchSettings(candidates="objects", max_per_class=NO_CAP),
    # objects where the prototypes outline separate objects, else the grid (the default's)
    "objects-auto": SearchSettings(candidates="auto", max_per_class=NO_CAP),
    # the grid only: the default before object candidates (the tables' "default" row then)
    "grid": SearchSettings(candidates="grid", max_per_class=NO_CAP),
}

#: split -> case -> seed (dev: may be looked at and tuned on; held-out: report only)
SEEDS: dict[str, dict[str, int]] = {
    "dev": {"motifs": 10, "nuclei": 110, "ihc cells": 210, "blood": 310, "plate": 410},
    "held-out": {"motifs": 20, "nuclei": 120, "ihc cells": 220, "blood": 320, "plate": 420},
}
for _split, _seeds in SEEDS.items():
    _seeds["ihc regions"] = 510 if _split == "dev" else 520  # one image: only the draws differ


@dataclass(frozen=True)
class Case:
    """One case: review and test images with truth; ``boxes`` gives the box a user draws
    around object ``k`` of class ``c`` of the review image; ``radius_l0`` the match radius.
    ``region``: the classes are regions of a label mask (review = test image), scored by
    precision of the ``REGION_TOP_K`` most similar suggestions, not PR-AUC."""

    name: str
    classes: tuple[str, ...]
    review: TruthImage
    test: tuple[TruthImage, ...]
    boxes: Callable[[str, int], BoxL0]
    radius_l0: float
    region: bool = False
    #: the seed of the prototype draws (the case's seed; set for the extra dev plates)
    seed: int | None = None


REGION_TOP_K = 25
REGION_PATCH_PX = 48.0


def _object_box(truth: GroundTruth) -> Callable[[str, int], BoxL0]:
    def box(c: str, k: int) -> BoxL0:
        x, y, w, h = truth.boxes(c)[k]
        return BoxL0(float(x), float(y), float(w), float(h))

    return box


def _median_side(truth: GroundTruth) -> float:
    boxes = np.concatenate([truth.boxes(c) for c in truth.classes])
    return float(np.median(np.maximum(boxes[:, 2], boxes[:, 3])))


def _truth_from_cells(
    centres: dict[str, list[tuple[float, float]]], diameters: dict[str, list[float]], src: str
) -> GroundTruth:
    boxes = {
        c: [(x - d / 2, y - d / 2, d, d) for (x, y), d in zip(pts, diameters[c], strict=True)]
        for c, pts in centres.items()
    }
    return GroundTruth.from_centres(centres, boxes_l0=boxes, source=src)


def motifs_case(root: Path, seed: int) -> Case:
    bench = synthetic_benchmark(
        root / f"motifs-{seed}",
        seed=seed,
        n_review=1,
        n_unlabelled=0,
        n_test=1,
        size=(1536, 1024),
        n_per_class=8,
    )
    size = bench.patch_size_l0
    review = bench.review[0]

    def box(c: str, k: int) -> BoxL0:
        cx, cy = review.truth.centres(c)[k]
        return square_box((float(cx), float(cy)), size)

    return Case("motifs", bench.classes, review, bench.test, box, paper_match_radius_l0(size))


def dense_case(root: Path, name: str, kind: str, seed: int, *, size: int) -> Case:
    from simsearch_wsi.synthetic.dense import make_dense_field

    params: dict[str, Any] = {"kind": kind, "radius": 7.0 if kind == "fluorescence" else 8.0}
    params["spacing"] = 1.15 if kind == "fluorescence" else 1.0
    images = []
    for s in (seed, seed + 1000):  # review, test
        path = root / f"{name.replace(' ', '_')}-{s}.tiff"
        slide = make_dense_field(path, width=size, height=size, seed=s, **params)
        csv = slide.to_csv(path.with_suffix(".truth.csv"))
        images.append(TruthImage(path, read_truth_csv(csv, classes=slide.classes)))
    review, test = images
    return Case(
        name,
        review.truth.classes,
        review,
        (test,),
        _object_box(review.truth),
        paper_match_radius_l0(_median_side(test.truth)),
    )


IHC_CLASSES = {"negative": 0.05, "positive": 0.6}
IHC_MPP = 0.5


def ihc_case(root: Path, seed: int, *, size: int) -> Case:
    from simsearch_wsi.io.tiff_writer import write_pyramidal_tiff
    from simsearch_wsi.synthetic.ihc import make_ihc_cell_field

    images = []
    for s in (seed, seed + 1000):
        field = make_ihc_cell_field((size, size), dab_levels=list(IHC_CLASSES.values()), seed=s)
        path = root / f"ihc-{s}.tiff"
        if not path.is_file():
            write_pyramidal_tiff(path, field.rgb, mpp=IHC_MPP, n_levels=1)
        centres: dict[str, list[tuple[float, float]]] = {c: [] for c in IHC_CLASSES}
        diameters: dict[str, list[float]] = {c: [] for c in IHC_CLASSES}
        for (x, y), r, dab in zip(
            field.centers_xy, field.nucleus_radius_px, field.nucleus_dab_od, strict=True
        ):
            c = min(IHC_CLASSES, key=lambda k: abs(IHC_CLASSES[k] - dab))
            centres[c].append((float(x), float(y)))
            diameters[c].append(float(2 * r * 1.5))  # the cell (nucleus x cell_radius_factor)
        images.append(TruthImage(path, _truth_from_cells(centres, diameters, str(path))))
    review, test = images
    return Case(
        "ihc cells",
        tuple(IHC_CLASSES),
        review,
        (test,),
        _object_box(review.truth),
        paper_match_radius_l0(_median_side(test.truth)),
    )


PLATE_WELLS = (("A",), ("1", "2"))
PLATE_CELLS_PER_FIELD = 24


def _plate_cells(root: Path, seed: int, *, size: int) -> dict[tuple[str, int], list[Any]]:
    """The plate of ``seed`` under ``root`` and its cells per (well, field): an existing plate
    written with the same parameters is reused (its record, written after the plate, says
    so), so that its feature cache (keyed by the images' mtime) stays valid; else it is
    written afresh."""
    from simsearch_wsi.core.atomic import write_json_atomic
    from simsearch_wsi.synthetic.phenotypes import make_phenotype_plate

    path = root / f"plate-{seed}.ome.zarr"
    record = root / f"plate-{seed}.cells.json"
    rows, columns = PLATE_WELLS
    import hashlib

    from simsearch_wsi.synthetic import phenotypes

    params = {
        # the generator's source: a changed generator writes the plate afresh
        "generator": hashlib.sha256(Path(phenotypes.__file__).read_bytes()).hexdigest(),
        "seed": seed,
        "rows": list(rows),
        "columns": list(columns),
        "field_size": size,
        "cells_per_field": PLATE_CELLS_PER_FIELD,
    }
    if path.is_dir() and record.is_file():
        saved = json.loads(record.read_text("utf-8"))
        if saved.get("params") == params:
            return {(w, int(f)): cells for w, f, cells in saved["cells"]}
    record.unlink(missing_ok=True)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    plate = make_phenotype_plate(
        path,
        rows=rows,
        columns=columns,
        field_size=size,
        cells_per_field=PLATE_CELLS_PER_FIELD,
        seed=seed,
    )
    cells: dict[tuple[str, int], list[Any]] = {
        key: [[c.x_l0, c.y_l0, c.phenotype, c.diameter_px] for c in v]
        for key, v in plate.cells.items()
    }
    write_json_atomic(record, {"params": params, "cells": [[*k, v] for k, v in cells.items()]})
    return cells


def plate_case(root: Path, seed: int, *, size: int) -> Case:
    from simsearch_wsi.synthetic.phenotypes import PHENOTYPES

    path = root / f"plate-{seed}.ome.zarr"
    cells = _plate_cells(root, seed, size=size)

    def image(well: str, f: int) -> TruthImage:
        centres: dict[str, list[tuple[float, float]]] = {c: [] for c in PHENOTYPES}
        diameters: dict[str, list[float]] = {c: [] for c in PHENOTYPES}
        for x_l0, y_l0, phenotype, diameter_px in cells[(well, f)]:
            centres[phenotype].append((float(x_l0), float(y_l0)))
            diameters[phenotype].append(float(diameter_px))
        p = path / well[0] / well[1:] / str(f)
        return TruthImage(p, _truth_from_cells(centres, diameters, str(p)))

    review = image("A1", 0)
    test = (image("A2", 0), image("A2", 1))
    side = float(np.median([_median_side(t.truth) for t in test]))
    return Case(
        "plate", PHENOTYPES, review, test, _object_box(review.truth), paper_match_radius_l0(side)
    )


def ihc_region_case(root: Path) -> Case:
    """scikit-image's IHC sample with the colour rule of :mod:`simsearch_wsi.eval.derived`
    (Epithelium = DAB-rich, Stroma = nuclei away from DAB): region pseudo-truth, one image
    (the same for both splits: there is only one)."""
    from skimage import data

    from simsearch_wsi.eval.derived import IHC_CLASSES as REGION_CLASSES
    from simsearch_wsi.eval.derived import ihc_pseudo_truth
    from simsearch_wsi.io.tiff_writer import write_pyramidal_tiff

    rgb = np.asarray(data.immunohistochemistry())
    path = root / "skimage_ihc.tiff"
    if not path.is_file():
        write_pyramidal_tiff(path, rgb, mpp=None, n_levels=2)
    image = TruthImage(path, ihc_pseudo_truth(rgb, source="IHC colour rule"), IHC_MPP)

    def no_box(c: str, k: int) -> BoxL0:
        raise AssertionError("region prototypes are drawn by region_prototypes")

    return Case("ihc regions", tuple(REGION_CLASSES), image, (image,), no_box, 0.0, True)


#: extra dev plates (``--cases plate@SEED``): other generator seeds than every split's plate
EXTRA_PLATE_SEEDS = (411, 412, 413, 414, 415)


def extra_plate_case(root: Path, split: str, name: str) -> Case:
    """``plate@SEED``: the plate case of another generator seed (dev only; never a seed of a
    split's own plate), named ``plate@SEED``: more dev plates, so a choice is not fit to one."""
    text = name.partition("@")[2]
    if split != "dev" or not text.isdigit():
        raise SystemExit(f"--cases {name!r}: plate@SEED is for --split dev only")
    seed = int(text)
    if seed not in EXTRA_PLATE_SEEDS or seed in {s["plate"] for s in SEEDS.values()}:
        raise SystemExit(f"--cases {name!r}: the extra dev plates are {EXTRA_PLATE_SEEDS}")
    case = plate_case(root, seed, size=512)
    return replace(case, name=name, seed=seed)


def build_cases(root: Path, split: str, names: list[str], *, quick: bool) -> list[Case]:
    root.mkdir(parents=True, exist_ok=True)
    seeds = SEEDS[split]
    size = 384
    makers: dict[str, Callable[[], Case]] = {
        "motifs": lambda: motifs_case(root, seeds["motifs"]),
        "nuclei": lambda: dense_case(root, "nuclei", "fluorescence", seeds["nuclei"], size=size),
        "ihc cells": lambda: ihc_case(root, seeds["ihc cells"], size=size),
        "blood": lambda: dense_case(root, "blood", "blood", seeds["blood"], size=size),
        "plate": lambda: plate_case(root, seeds["plate"], size=512),
        "ihc regions": lambda: ihc_region_case(root),
    }
    return [
        extra_plate_case(root, split, n) if n.startswith("plate@") else makers[n]() for n in names
    ]


def draw_prototypes(case: Case, per_class: int, rng: np.random.Generator) -> list[Prototype]:
    if case.region:
        from simsearch_wsi.eval.search_quality import region_prototypes

        h, w = case.review.truth.mask.shape if case.review.truth.mask is not None else (0, 0)
        sx, sy = case.review.truth.mask_downsample
        drawn = region_prototypes(
            case.review,
            case.classes,
            per_class=per_class + 10,
            patch_size_l0=REGION_PATCH_PX,
            rng=rng,
        )
        inside = [
            p
            for p in drawn
            if p.box.x_l0 >= 0
            and p.box.y_l0 >= 0
            and p.box.x_l0 + p.box.width_l0 <= w * sx
            and p.box.y_l0 + p.box.height_l0 <= h * sy
        ]
        return [
            p for c in case.classes for p in [q for q in inside if q.class_name == c][:per_class]
        ]
    out = []
    for c in case.classes:
        n = case.review.truth.n_objects(c)
        for k in sorted(rng.choice(n, size=min(per_class, n), replace=False)):
            out.append(Prototype(c, case.boxes(c, int(k)), image=case.review.key))
    return out


def recall_at_precision(pr: ClassPR, level: float = PRECISION_LEVEL) -> float:
    """The highest recall of the curve at which precision is >= ``level`` (0 when never)."""
    ok = pr.precision >= level
    return float(np.max(pr.recall[ok])) if ok.any() else 0.0


def region_score(search: SimSearch, case: Case, prototypes: list[Prototype]) -> dict[str, float]:
    """Precision of the ``REGION_TOP_K`` most similar suggestions per class (a suggestion is
    right when at least half of its box is the class)."""
    from simsearch_wsi.eval.search_quality import REGION_HIT_FRACTION

    image = case.review
    with open_image(image.path, mpp=image.mpp) as img:
        result = search.suggest(
            img, prototypes, thresholds=dict.fromkeys(case.classes, NO_THRESHOLD)
        )
    out = {}
    for c in case.classes:
        ranked = sorted(
            (s for s in result.suggestions if s.class_name == c), key=lambda s: -s.similarity
        )[:REGION_TOP_K]
        hits = [image.truth.mask_fraction(s.box, c) >= REGION_HIT_FRACTION for s in ranked]
        out[c] = float(np.mean(hits)) if hits else 0.0
    return out


def score(search: SimSearch, case: Case, prototypes: list[Prototype]) -> dict[str, ClassPR]:
    parts: dict[str, list[ClassPR]] = {c: [] for c in case.classes}
    for t in case.test:
        with open_image(t.path, mpp=t.mpp) as img:
            result = search.suggest(
                img,
                prototypes,
                thresholds=dict.fromkeys(case.classes, NO_THRESHOLD),
                open_image=lambda p: open_image(p),
            )
        for c in case.classes:
            parts[c].append(
                class_pr(
                    result.suggestions,
                    t.truth,
                    class_name=c,
                    max_distance_l0=case.radius_l0,
                    score=lambda s: float(s.similarity),
                )
            )
    return {c: pool_class_pr(v) for c, v in parts.items()}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_output/search_suite"))
    parser.add_argument("--split", choices=tuple(SEEDS), default="dev")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--cases", default=",".join(SEEDS["dev"]))
    parser.add_argument("--prototypes", default="1,2,5", help="P per class, comma list")
    parser.add_argument("--draws", type=int, default=3, help="prototype draws per P")
    parser.add_argument("--quick", action="store_true", help="1 draw, P = 2 only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--objects-set",
        default="",
        metavar="NAME=VALUE,...",
        help="dev ablations of the object candidates: set constants of simsearch_wsi.search."
        "objects for this run (numbers; OBJECT_SIZE_RANGE=LOW:HIGH; OBJECT_FEATURE_NORM=keep "
        "for the search's own feature normalisation)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    changed = set_object_constants(args.objects_set)
    ps = [2] if args.quick else [int(v) for v in args.prototypes.split(",") if v]
    draws = 1 if args.quick else args.draws
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cases = build_cases(out / f"data-{args.split}", args.split, args.cases.split(","), quick=False)
    trunk, bspec, info = build_trunk("resnet18-l3", "embedded", seed=0)
    extractor = FeatureExtractor(trunk, bspec, info, device=torch.device("cpu"))
    cache = FeatureCache(out / "cache")
    configs = [c for c in args.configs.split(",") if c]
    rows: list[dict[str, Any]] = []
    for name in configs:
        base, _, row_set = name.partition("@")
        if base not in CONFIGS:
            raise SystemExit(f"--configs: unknown configuration {base!r}")
        saved = set_object_constants(row_set.replace(";", ","), restore=True)
        search = SimSearch(extractor, cache, settings=CONFIGS[base])
        row: dict[str, Any] = {"config": name, "cases": {}}
        t0 = time.perf_counter()
        for case in cases:
            res: dict[str, Any] = {"per_p": {}}
            for p in ps:
                ap: dict[str, list[float]] = {c: [] for c in case.classes}
                rec: dict[str, list[float]] = {c: [] for c in case.classes}
                for d in range(draws):
                    seed = SEEDS[args.split][case.name] if case.seed is None else case.seed
                    protos = draw_prototypes(case, p, np.random.default_rng([seed, p, d]))
                    if case.region:
                        for c, v in region_score(search, case, protos).items():
                            ap[c].append(v)
                            rec[c].append(float("nan"))
                        continue
                    for c, pr in score(search, case, protos).items():
                        ap[c].append(float(pr.ap))
                        rec[c].append(recall_at_precision(pr))
                res["per_p"][str(p)] = {
                    "pr_auc": _mean([_mean(v) for v in ap.values()]),
                    "recall_p90": _mean([_mean(v) for v in rec.values()]),
                    "per_class_pr_auc": {c: _mean(v) for c, v in ap.items()},
                    "per_class_recall_p90": {c: _mean(v) for c, v in rec.items()},
                    "draws_pr_auc": ap,
                }
            res["pr_auc"] = _mean([v["pr_auc"] for v in res["per_p"].values()])
            res["recall_p90"] = _mean([v["recall_p90"] for v in res["per_p"].values()])
            res["per_class_pr_auc"] = {
                c: _mean([v["per_class_pr_auc"][c] for v in res["per_p"].values()])
                for c in case.classes
            }
            res["per_class_recall_p90"] = {
                c: _mean([v["per_class_recall_p90"][c] for v in res["per_p"].values()])
                for c in case.classes
            }
            row["cases"][case.name] = res
            print(
                f"{name:>12} {case.name:>10}: PR-AUC {res['pr_auc']:.3f} "
                f"recall@p0.9 {res['recall_p90']:.3f} "
                + " ".join(f"P{p}={v['pr_auc']:.3f}" for p, v in res["per_p"].items())
                + f" [{time.perf_counter() - t0:.0f} s]",
                flush=True,
            )
        scored = [c.name for c in cases if not c.region]  # PR-AUC cases (regions: precision)
        row["mean_pr_auc"] = _mean([row["cases"][n]["pr_auc"] for n in scored])
        row["mean_recall_p90"] = _mean([row["cases"][n]["recall_p90"] for n in scored])
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        restore_object_constants(saved)
    record = {
        "split": args.split,
        "seeds": SEEDS[args.split],
        "prototypes_per_class": ps,
        "draws": draws,
        "configs": {n: repr(CONFIGS[n.partition("@")[0]]) for n in configs},
        "cases": {
            c.name: {
                "classes": list(c.classes),
                "review": str(c.review.path),
                "test": [str(t.path) for t in c.test],
                "objects_test": [t.truth.counts() for t in c.test],
                "radius_l0": c.radius_l0,
                "region": c.region,
            }
            for c in cases
        },
        "torch": torch.__version__,
        "objects_set": changed,
        "rows": rows,
    }
    (out / f"results-{args.split}.json").write_text(json.dumps(record, indent=1), "utf-8")
    (out / f"results-{args.split}.md").write_text(markdown(record), "utf-8")
    print(markdown(record))


def set_object_constants(text: str, *, restore: bool = False) -> dict[str, Any]:
    """Set constants of :mod:`simsearch_wsi.search.objects` from ``NAME=VALUE,...`` (dev
    ablations); returns what was set (``restore``: their values before, for
    :func:`restore_object_constants`)."""
    from simsearch_wsi.search import objects

    changed: dict[str, Any] = {}
    before: dict[str, Any] = {}
    for item in (t for t in text.split(",") if t):
        name, _, value = item.partition("=")
        current = getattr(objects, name, None)
        if current is None or not name.isupper():
            raise SystemExit(f"--objects-set: {name!r} is not a constant of search.objects")
        new: Any
        if name == "OBJECT_FEATURE_NORM":
            new = {} if value == "keep" else {"whiten": value}
        elif isinstance(current, tuple):
            new = tuple(float(v) for v in value.split(":"))
        else:
            new = type(current)(float(value))
        before.setdefault(name, current)
        setattr(objects, name, new)
        changed[name] = new
    return before if restore else changed


def restore_object_constants(values: dict[str, Any]) -> None:
    """Put back constants of :mod:`simsearch_wsi.search.objects` (``set_object_constants``'s
    ``restore`` answer)."""
    from simsearch_wsi.search import objects

    for name, value in values.items():
        setattr(objects, name, value)


def markdown(record: dict[str, Any]) -> str:
    rows = record["rows"]
    all_names = list(record["cases"])
    names = [n for n in all_names if not record["cases"][n]["region"]]
    regions = [n for n in all_names if record["cases"][n]["region"]]
    lines = [
        f"PR-AUC (recall at precision 0.9), split {record['split']}, mean over P = "
        f"{record['prototypes_per_class']} and {record['draws']} draw(s)"
        + (
            f"; {', '.join(regions)}: precision@{REGION_TOP_K}, not in the mean:"
            if regions
            else ":"
        ),
        "",
        "| config | " + " | ".join(names) + " | mean | " + " | ".join(regions) + " |",
        "|---|" + "---|" * (len(names) + 1 + len(regions)),
    ]
    for r in rows:
        cells = [
            f"{r['cases'][n]['pr_auc']:.3f} ({r['cases'][n]['recall_p90']:.3f})" for n in names
        ]
        tail = [f"{r['cases'][n]['pr_auc']:.3f}" for n in regions]
        lines.append(
            f"| {r['config']} | "
            + " | ".join(cells)
            + f" | **{r['mean_pr_auc']:.3f}** ({r['mean_recall_p90']:.3f}) | "
            + " | ".join(tail)
            + " |"
        )
    lines += ["", "PR-AUC per P (mean over cases):", ""]
    ps = record["prototypes_per_class"]
    lines += ["| config | " + " | ".join(f"P = {p}" for p in ps) + " |"]
    lines += ["|---|" + "---|" * len(ps)]
    for r in rows:
        cells = [
            f"{_mean([r['cases'][n]['per_p'][str(p)]['pr_auc'] for n in names]):.3f}" for p in ps
        ]
        lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    lines += ["", "PR-AUC (recall at precision 0.9) per class (region cases: precision@25):", ""]
    lines += ["| config | case | class | PR-AUC | recall@p0.9 |", "|---|---|---|---|---|"]
    for r in rows:
        for n in all_names:
            res = r["cases"][n]
            for c in record["cases"][n]["classes"]:
                lines.append(
                    f"| {r['config']} | {n} | {c} | {res['per_class_pr_auc'][c]:.3f} | "
                    f"{res['per_class_recall_p90'][c]:.3f} |"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
