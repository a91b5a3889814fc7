"""The screening case of issue 30: a plate of separate cells with three reporter phenotypes,
played through the command line as a user would, scored per cell.

The plate (:func:`simsearch_wsi.synthetic.phenotypes.make_phenotype_plate`): 2 channels
(GFP, DNA), uint8, **no pixel size**, rows A-C x columns 1-4, 2 fields of 512 x 512 px per
well, 24 separate cells per field (13-80 px), phenotypes ``no_gfp``, ``cytoplasmic_gfp`` and
``nuclear_gfp`` in every field, a gain per well and channel (plate effect), a background offset
and an illumination gradient per field.

The loop, every step a ``simsearch-wsi`` command run in this process:

1. **prototypes** in the two control wells A1 and A2 (``--prototypes`` per class in all, the
   first well's field 0 gets the larger half): a ``--box-px`` square around a random cell of
   the class, exported as QuPath GeoJSON;
2. ``suggest PLATE --wells A1 --fields 0 --annotations ... --session S --background 5`` on each
   control field (the fields without prototypes use the saved ones), then a simulated reviewer
   edits the GeoJSON as a user would in QuPath: a suggestion on a cell of its class is kept,
   one on a cell of another class is relabelled to that class, one on no cell gets
   ``Rejected suggestion``; a background candidate is kept when no cell centre is inside its
   box, else rejected; ``review`` records it;
3. ``train --session S --head-input H --noisy-images PLATE --wells A3,A4`` (unreviewed wells of
   the control row) for each ``--heads``;
4. ``predict PLATE --wells B1,...,C4`` (the held-out rows) and, for the search alone,
   ``suggest`` with the session's prototypes and thresholds on each held-out field.

Scoring, per true cell of the held-out fields: the detections (suggestions) whose centre lies
within ``max(radius, 6)`` px of the cell's centre; the cell's predicted phenotype is the class
of the best-scoring one, or *missed* when there is none (a miss counts as wrong). **Balanced
accuracy** = mean over the three phenotypes of the fraction of cells predicted right. Also
reported: recall per phenotype, missed cells, and detections on no cell.

    .venv/bin/python benchmarks/phenotype_plate.py --out bench_output/phenotype_plate --threads 2

``--predict-extra=OPTIONS`` (repeatable) predicts again with the same trained model and extra
``predict`` options (e.g. ``--predict-extra=--object-size-px 20``), scored alike;
``--again`` does that on a finished run's models without redoing the loop.

Writes ``results.json`` and ``results.md`` under --out. Results: docs/evaluation.md,
"Screening plate: phenotypes of separate cells".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simsearch_wsi.cli.main import main as cli
from simsearch_wsi.features import preprocess
from simsearch_wsi.qupath.geojson import BACKGROUND_CLASS, REJECTED_CLASS
from simsearch_wsi.synthetic.phenotypes import PHENOTYPES, PhenotypeCell, make_phenotype_plate

ROWS = ("A", "B", "C")
COLUMNS = ("1", "2", "3", "4")
CONTROL_WELLS = ("A1", "A2")
NOISY_WELLS = ("A3", "A4")
HELD_OUT_WELLS = tuple(f"{r}{c}" for r in ROWS[1:] for c in COLUMNS)
MISSED = "missed"


def _run(args: list[str]) -> str:
    """One CLI call in this process; its stdout, or an error with its stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(args)
    if code != 0:
        raise RuntimeError(f"simsearch-wsi {' '.join(args)} -> {code}: {err.getvalue()[-2000:]}")
    return out.getvalue()


def _box(x: float, y: float, side: float) -> list[list[float]]:
    x0, y0 = x - side / 2, y - side / 2
    return [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]


def _prototype_file(cells: list[PhenotypeCell], path: Path, side: float, field_size: int) -> Path:
    feats = []
    for c in cells:
        x = min(max(c.x_l0, side / 2), field_size - side / 2)
        y = min(max(c.y_l0, side / 2), field_size - side / 2)
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [_box(x, y, side)]},
                "properties": {"objectType": "annotation", "classification": c.phenotype},
            }
        )
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def _center(feature: dict[str, Any]) -> tuple[float, float]:
    ring = np.asarray(feature["geometry"]["coordinates"][0], dtype=float)
    return float(ring[:-1, 0].mean()), float(ring[:-1, 1].mean())


def _cell_at(cells: tuple[PhenotypeCell, ...], x: float, y: float) -> PhenotypeCell | None:
    """The cell whose centre is nearest (x, y), if (x, y) is within its radius (at least 6 px)."""
    best, best_d = None, float("inf")
    for c in cells:
        d = float(np.hypot(c.x_l0 - x, c.y_l0 - y))
        if d <= max(c.diameter_px / 2, 6.0) and d < best_d:
            best, best_d = c, d
    return best


def _class(feature: dict[str, Any]) -> str:
    cls = feature["properties"].get("classification")
    return str(cls["name"] if isinstance(cls, dict) else cls)


def _review(doc: dict[str, Any], cells: tuple[PhenotypeCell, ...], side: float) -> dict[str, Any]:
    """The simulated reviewer's edit of a suggestions file (module docstring, step 2)."""
    out = []
    for f in doc["features"]:
        g = json.loads(json.dumps(f))
        x, y = _center(f)
        name = _class(f)
        if name == BACKGROUND_CLASS:
            inside = any(abs(c.x_l0 - x) < side / 2 and abs(c.y_l0 - y) < side / 2 for c in cells)
            if inside:
                g["properties"]["classification"] = {"name": REJECTED_CLASS, "color": [1, 2, 3]}
        else:
            cell = _cell_at(cells, x, y)
            if cell is None:
                g["properties"]["classification"] = {"name": REJECTED_CLASS, "color": [1, 2, 3]}
            elif cell.phenotype != name:
                g["properties"]["classification"] = {"name": cell.phenotype, "color": [1, 2, 3]}
        out.append(g)
    return {"type": "FeatureCollection", "features": out}


def _score(
    detections: dict[tuple[str, int], list[tuple[str, float, float, float]]],
    truth: dict[tuple[str, int], tuple[PhenotypeCell, ...]],
) -> dict[str, Any]:
    """Per-cell phenotype calls from detections (class, x, y, score) of each held-out field."""
    right = dict.fromkeys(PHENOTYPES, 0)
    total = dict.fromkeys(PHENOTYPES, 0)
    missed = 0
    off_cell = 0
    n_det = 0
    for key, cells in truth.items():
        dets = detections.get(key, [])
        n_det += len(dets)
        off_cell += sum(1 for _, x, y, _ in dets if _cell_at(cells, x, y) is None)
        for c in cells:
            near = [
                (s, name)
                for name, x, y, s in dets
                if np.hypot(c.x_l0 - x, c.y_l0 - y) <= max(c.diameter_px / 2, 6.0)
            ]
            call = max(near)[1] if near else MISSED
            total[c.phenotype] += 1
            right[c.phenotype] += call == c.phenotype
            missed += call == MISSED
    recall = {p: right[p] / total[p] for p in PHENOTYPES}
    return {
        "balanced_accuracy": round(float(np.mean(list(recall.values()))), 3),
        "recall": {p: round(v, 3) for p, v in recall.items()},
        "cells": sum(total.values()),
        "missed_cells": missed,
        "detections": n_det,
        "detections_on_no_cell": off_cell,
    }


def _detections_of(doc: dict[str, Any], measure: str) -> list[tuple[str, float, float, float]]:
    out = []
    for f in doc["features"]:
        if f["properties"].get("objectType") != "detection":
            continue
        name = _class(f)
        if name in (BACKGROUND_CLASS, REJECTED_CLASS):
            continue
        x, y = _center(f)
        out.append((name, x, y, float(f["properties"]["measurements"][measure])))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    preprocess.SEARCH_NORMALIZATION_SCOPE = args.normalization
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    plate = make_phenotype_plate(
        out / "screen.ome.zarr",
        rows=ROWS,
        columns=COLUMNS,
        fields_per_well=2,
        field_size=512,
        cells_per_field=24,
        mpp=None,
        seed=args.seed,
    )
    p = str(plate.path)
    engine = ["--weights", args.weights, "--cache", str(out / "cache"), "--tile-size", "512"]
    # the patch rule: the search default when docs/evaluation.md's "Screening plate" tables were
    # run (the object rule is the default since issue 18; not rerun with it)
    engine.append("--no-dense")
    rng = np.random.default_rng(args.seed)
    session = out / "session"
    side = float(args.box_px)
    # 1. prototypes: per class, the larger half in A1 field 0, the rest in A2 field 0
    first = (args.prototypes + 1) // 2
    picks: dict[str, list[PhenotypeCell]] = {}
    for well, n in ((CONTROL_WELLS[0], first), (CONTROL_WELLS[1], args.prototypes - first)):
        cells = plate.cells[(well, 0)]
        chosen: list[PhenotypeCell] = []
        for ph in PHENOTYPES:
            of_class = [c for c in cells if c.phenotype == ph]
            chosen += [of_class[i] for i in rng.permutation(len(of_class))[:n]]
        picks[well] = chosen
    # 2. suggest and review every control field
    times: dict[str, float] = {}
    t = time.perf_counter()
    for well in CONTROL_WELLS:
        for field in range(plate.fields_per_well):
            sel = ["--wells", well, "--fields", str(field)]
            sug = out / f"suggest_{well}_f{field}.geojson"
            protos = []
            if field == 0:
                path = _prototype_file(
                    picks[well], out / f"prototypes_{well}.geojson", side, plate.field_size
                )
                protos = ["--annotations", str(path)]
                for ph in PHENOTYPES:  # the user's starting threshold, saved in the session
                    protos += ["--threshold", f"{ph}={args.threshold}"]
            _run(
                [
                    "suggest",
                    p,
                    *sel,
                    *protos,
                    "--session",
                    str(session),
                    "--out",
                    str(sug),
                    "--background",
                    "5",
                    *engine,
                ]
            )
            reviewed = out / f"reviewed_{well}_f{field}.geojson"
            doc = _review(json.loads(sug.read_text()), plate.cells[(well, field)], side)
            reviewed.write_text(json.dumps(doc))
            _run(["review", p, *sel, "--annotations", str(reviewed), "--session", str(session)])
    times["suggest+review (4 control fields)"] = time.perf_counter() - t
    results: dict[str, Any] = {}
    truth = {(w, f): plate.cells[(w, f)] for w in HELD_OUT_WELLS for f in range(args.fields)}
    # 4a. the search alone, with the session's prototypes and thresholds (on a copy)
    if not args.skip_search:
        t = time.perf_counter()
        probe = out / "session_search_only"
        shutil.copytree(session, probe)
        dets: dict[tuple[str, int], list[tuple[str, float, float, float]]] = {}
        for w, f in truth:
            sug = out / "search_only" / f"{w}_f{f}.geojson"
            sug.parent.mkdir(exist_ok=True)
            _run(
                [
                    "suggest",
                    p,
                    "--wells",
                    w,
                    "--fields",
                    str(f),
                    "--session",
                    str(probe),
                    "--out",
                    str(sug),
                    *engine,
                ]
            )
            dets[(w, f)] = _detections_of(json.loads(sug.read_text()), "similarity")
        results["search"] = _score(dets, truth)
        times["search on held-out fields"] = time.perf_counter() - t
    # 3 + 4b. train and predict, per head
    for head in args.heads.split(","):
        t = time.perf_counter()
        model = out / f"model_{head}.zip"
        _run(
            [
                "train",
                "--session",
                str(session),
                "--out",
                str(model),
                "--head-input",
                head,
                "--preset",
                args.preset,
                "--noisy-images",
                p,
                "--wells",
                ",".join(NOISY_WELLS),
                "--seed",
                str(args.seed),
                *engine,
            ]
        )
        times[f"train {head}"] = time.perf_counter() - t
        t = time.perf_counter()
        pred = out / f"predict_{head}"
        _predict(p, model, pred, out, args.fields, [])
        times[f"predict {head}"] = time.perf_counter() - t
        results[f"model ({head})"] = _score_models(pred, truth)
        results[f"model ({head}) at cell centres"] = _score_centres(pred, truth)
        # the same model, predicted again with extra options (e.g. --object-size-px 20)
        for k, extra in enumerate(args.predict_extra or []):
            t = time.perf_counter()
            alt = out / f"predict_{head}_extra{k}"
            _predict(p, model, alt, out, args.fields, extra.split(), no_zarr=True)
            times[f"predict {head} {extra}"] = time.perf_counter() - t
            results[f"model ({head}) {extra}"] = _score_models(alt, truth)
    return {
        "seed": args.seed,
        "prototypes_per_class": args.prototypes,
        "box_px": side,
        "weights": args.weights,
        "normalization": args.normalization,
        "threshold": args.threshold,
        "held_out": f"{len(truth)} fields of {', '.join(HELD_OUT_WELLS)}",
        "preset": args.preset,
        "results": results,
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "total_seconds": round(time.perf_counter() - t0, 1),
    }


def _predict(
    plate: str,
    model: Path,
    pred: Path,
    out: Path,
    fields: int,
    extra: list[str],
    *,
    no_zarr: bool = False,
) -> None:
    """``predict`` on the held-out wells' first ``fields`` fields into ``pred``."""
    _run(
        [
            "predict",
            plate,
            "--wells",
            ",".join(HELD_OUT_WELLS),
            "--model",
            str(model),
            "--out",
            str(pred),
            "--cache",
            str(out / "cache"),
            "--tile-size",
            "512",
            "--fields",
            ",".join(str(f) for f in range(fields)),
            *(["--no-zarr"] if no_zarr else []),
            *extra,
        ]
    )


def _score_models(
    pred: Path, truth: dict[tuple[str, int], tuple[PhenotypeCell, ...]]
) -> dict[str, Any]:
    """Score a predict folder: each detection's score is its class probability."""
    dets: dict[tuple[str, int], list[tuple[str, float, float, float]]] = {}
    for w, f in truth:
        doc = json.loads((pred / f"screen_{w}_f{f}.geojson").read_text())
        found = []
        for feat in doc["features"]:
            if feat["properties"].get("objectType") != "detection":
                continue
            name = _class(feat)
            meas = feat["properties"].get("measurements", {})
            x, y = _center(feat)
            found.append((name, x, y, float(meas.get(f"probability {name}", 0.0))))
        dets[(w, f)] = found
    return _score(dets, truth)


def _score_centres(
    pred: Path, truth: dict[tuple[str, int], tuple[PhenotypeCell, ...]]
) -> dict[str, Any]:
    """Per-cell calls at the true cell centres: the phenotype with the highest probability in
    the model's probability image (``<stem>.ome.zarr``) at each cell's centre, as a screen with
    its own nucleus segmentation would classify its cells (no detection step)."""
    from simsearch_wsi.io import open_image

    right = dict.fromkeys(PHENOTYPES, 0)
    total = dict.fromkeys(PHENOTYPES, 0)
    for (w, f), cells in truth.items():
        with open_image(pred / f"screen_{w}_f{f}.ome.zarr") as img:
            width, height = img.dimensions
            probs = img.read_region((0, 0), 0, (width, height))
            names = img.channel_names
        with open_image(pred.parent / "screen.ome.zarr" / w[0] / w[1:] / str(f)) as field:
            sx, sy = width / field.dimensions[0], height / field.dimensions[1]
        for c in cells:
            v = probs[min(int(c.y_l0 * sy), height - 1), min(int(c.x_l0 * sx), width - 1)]
            ranked = [names[i] for i in np.argsort(-v.astype(float)) if names[i] in PHENOTYPES]
            total[c.phenotype] += 1
            right[c.phenotype] += ranked[0] == c.phenotype
    recall = {p: right[p] / total[p] for p in PHENOTYPES}
    return {
        "balanced_accuracy": round(float(np.mean(list(recall.values()))), 3),
        "recall": {p: round(v, 3) for p, v in recall.items()},
        "cells": sum(total.values()),
    }


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| seed | normalisation | method | balanced accuracy | recall no / cyto / nuclear "
        "| missed cells | detections on no cell |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for method, s in r["results"].items():
            rec = " / ".join(f"{s['recall'][p]:.2f}" for p in PHENOTYPES)
            missed = f"{s['missed_cells']}/{s['cells']}" if "missed_cells" in s else "-"
            off = f"{s['detections_on_no_cell']}/{s['detections']}" if "detections" in s else "-"
            lines.append(
                f"| {r['seed']} | {r['normalization']} | {method} | "
                f"{s['balanced_accuracy']:.3f} | {rec} | {missed} | {off} |"
            )
    return "\n".join(lines) + "\n"


def rescore(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Score a finished run's folder again (``results.json`` beside it): the same plate and
    truth (regenerated from the seed), the search's and each model's outputs as written."""
    import tempfile

    row = json.loads((folder.parent / "results.json").read_text())[0]
    with tempfile.TemporaryDirectory() as tmp:
        plate = make_phenotype_plate(
            Path(tmp) / "screen.ome.zarr",
            rows=ROWS,
            columns=COLUMNS,
            fields_per_well=2,
            field_size=512,
            cells_per_field=24,
            mpp=None,
            seed=row["seed"],
        )
    truth = {(w, f): plate.cells[(w, f)] for w in HELD_OUT_WELLS for f in range(args.fields)}
    dets = {
        (w, f): _detections_of(
            json.loads((folder / "search_only" / f"{w}_f{f}.geojson").read_text()), "similarity"
        )
        for w, f in truth
        if (folder / "search_only").is_dir()
    }
    results: dict[str, Any] = {}
    if (folder / "search_only").is_dir():
        results["search"] = _score(dets, truth)
    for pred in sorted(folder.glob("predict_*")):
        head = pred.name[len("predict_") :]
        results[f"model ({head})"] = _score_models(pred, truth)
        results[f"model ({head}) at cell centres"] = _score_centres(pred, truth)
    return {**row, "results": results}


def again(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Predict again with each ``--predict-extra`` using a finished run's trained models (its
    plate, cache and ``model_<head>.zip`` under ``folder``); scored as in :func:`run`."""
    import tempfile

    row = json.loads((folder.parent / "results.json").read_text())[0]
    with tempfile.TemporaryDirectory() as tmp:
        plate = make_phenotype_plate(
            Path(tmp) / "screen.ome.zarr",
            rows=ROWS,
            columns=COLUMNS,
            fields_per_well=2,
            field_size=512,
            cells_per_field=24,
            mpp=None,
            seed=row["seed"],
        )
    truth = {(w, f): plate.cells[(w, f)] for w in HELD_OUT_WELLS for f in range(args.fields)}
    results: dict[str, Any] = {}
    times: dict[str, float] = {}
    p = str(folder / "screen.ome.zarr")
    for head in args.heads.split(","):
        model = folder / f"model_{head}.zip"
        results[f"model ({head})"] = _score_models(folder / f"predict_{head}", truth)
        for extra in args.predict_extra or []:
            t = time.perf_counter()
            alt = folder / f"predict_{head}_again_{'_'.join(extra.split()).strip('-')}"
            if alt.exists():
                shutil.rmtree(alt)
            _predict(p, model, alt, folder, args.fields, extra.split(), no_zarr=True)
            times[f"predict {head} {extra}"] = round(time.perf_counter() - t, 1)
            results[f"model ({head}) {extra}"] = _score_models(alt, truth)
    return {**row, "results": results, "seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", default="0", help="comma-separated plate seeds")
    parser.add_argument("--prototypes", type=int, default=5, help="per class (default 5)")
    parser.add_argument(
        "--box-px", type=float, default=24.0, help="prototype box side (default 24; 40 before)"
    )
    parser.add_argument("--heads", default="search", help="train --head-input values")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--weights", default="embedded")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--normalization",
        default=preprocess.SEARCH_NORMALIZATION_SCOPE,
        choices=["plate", "image"],
        help="channel normalisation of the search (features.preprocess.search_normalization)",
    )
    parser.add_argument(
        "--threshold", type=float, default=0.3, help="the user's starting similarity threshold"
    )
    parser.add_argument("--fields", type=int, default=1, help="held-out fields per well (1-2)")
    parser.add_argument(
        "--rescore", action="store_true", help="score the finished runs under --out again"
    )
    parser.add_argument(
        "--again",
        action="store_true",
        help="predict again with each --predict-extra using the finished runs' models under --out",
    )
    parser.add_argument("--skip-search", action="store_true", help="score the trained models only")
    parser.add_argument(
        "--predict-extra",
        action="append",
        metavar="OPTIONS",
        help="predict again with these extra options (one string, e.g. '--object-size-px 20'), "
        "same model; repeatable",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    root = Path(args.out)
    if args.again:
        rows = [again(root / f"seed{s}", args) for s in args.seeds.split(",")]
        (root / "again.json").write_text(json.dumps(rows, indent=1))
        print(_markdown(rows))
        return
    if args.rescore:
        rows = [rescore(root / f"seed{s}", args) for s in args.seeds.split(",")]
        (root / "results.json").write_text(json.dumps(rows, indent=1))
        (root / "results.md").write_text(_markdown(rows))
        print(_markdown(rows))
        return
    for seed in (int(s) for s in args.seeds.split(",")):
        ns = argparse.Namespace(**{**vars(args), "seed": seed, "out": str(root / f"seed{seed}")})
        rows.append(run(ns))
        print(json.dumps(rows[-1], indent=1), flush=True)
    (root / "results.json").write_text(json.dumps(rows, indent=1))
    (root / "results.md").write_text(_markdown(rows))
    print(_markdown(rows))


if __name__ == "__main__":
    main()
