"""Validation of IHC positive-cell scoring (issue 22). Results: docs/evaluation.md.

    python benchmarks/bench_ihc.py [--data ../shared/data] [--json FILE]

Three parts, each printed as a table:

* ``synthetic``: fields of separated cells with known nucleus DAB OD drawn uniformly in
  0..1 (so some cells sit near a threshold), 5 seeds: cells found, per-cell |DAB OD error|,
  per-cell bin agreement, positive % and H-score against the truth.
* ``reference``: on the public IHC sample (scikit-image's ``immunohistochemistry``), every
  detected nucleus' DAB OD mean from this project's deconvolution vs the same nucleus'
  mean of scikit-image's ``rgb2hed`` DAB channel rescaled to log10 OD units (an independent,
  maintained deconvolution with its own stain matrix): correlation, and agreement of the
  positive/negative call at QuPath's 0.2 and of the 0/1+/2+/3+ bins.
* ``public``: positive % and H-score of the public crops under the default settings, estimated
  stains, the OD-sum detection image and thresholds +-0.05; the QuPath H&E export (no DAB) is
  a negative control.
* ``--speed``: cell detection throughput (``detect_cells``, default settings, 1024 px tiles) on a
  4096 x 4096 synthetic field of 16,384 cells at 0.5 um/px, with and without outlines.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from simsearch_wsi.infer.cells import (
    QUPATH_H_DAB,
    CellDetectionParams,
    detect_cells,
    detect_cells_rgb,
    estimate_stains,
)
from simsearch_wsi.infer.ihc import PositivityRule, Region, intensity_bins, score_regions
from simsearch_wsi.io import ArraySource
from simsearch_wsi.synthetic.ihc import make_ihc_cell_field

THRESHOLDS = (0.2, 0.4, 0.6)
# rgb2hed: -ln(I) / -ln(1e-6) per channel, so its units are ln(10) / ln(1e6) = 1/6 of log10 OD
RGB2HED_TO_LOG10 = math.log(1e6) / math.log(10)


def synthetic(seeds: range) -> list[dict[str, Any]]:
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(1000 + seed)
        levels = rng.uniform(0.0, 1.0, 64)
        f = make_ihc_cell_field((320, 320), dab_levels=levels, seed=seed)
        cells = detect_cells_rgb(f.rgb, mpp=0.5)
        d = np.hypot(
            cells.x_l0[:, None] - f.centers_xy[None, :, 0],
            cells.y_l0[:, None] - f.centers_xy[None, :, 1],
        )
        idx = d.argmin(axis=1)
        matched = d.min(axis=1) < 3.0
        truth_v = f.nucleus_dab_od
        got_v = cells.measurements["Nucleus: DAB OD mean"]
        t_bins = intensity_bins(truth_v, THRESHOLDS)
        g_bins = intensity_bins(got_v, THRESHOLDS)
        scores, _ = score_regions(cells, [Region("Image")], rule=PositivityRule(), mpp=0.5)
        truth_pct = 100 * (t_bins > 0).mean()
        p = np.bincount(t_bins, minlength=4) / t_bins.size * 100
        truth_h = p[1] + 2 * p[2] + 3 * p[3]
        rows.append(
            {
                "seed": seed,
                "cells": len(f.centers_xy),
                "found": len(cells),
                "matched_unique": len(set(idx[matched].tolist())),
                "dab_abs_err_mean": float(np.abs(got_v - truth_v[idx]).mean()),
                "dab_abs_err_max": float(np.abs(got_v - truth_v[idx]).max()),
                "bin_agreement": float((g_bins == t_bins[idx]).mean()),
                "positive_pct_truth": float(truth_pct),
                "positive_pct": scores[0].positive_pct,
                "h_score_truth": float(truth_h),
                "h_score": scores[0].h_score,
            }
        )
    return rows


def reference(rgb: np.ndarray, mpp: float) -> dict[str, Any]:
    from skimage.color import rgb2hed

    cells = detect_cells_rgb(rgb, mpp=mpp, with_geometry=True)
    dab_sk = rgb2hed(rgb)[..., 2] * RGB2HED_TO_LOG10
    from skimage.draw import polygon as fill_polygon

    ref = np.empty(len(cells))
    for i, poly in enumerate(cells.nuclei):
        xs, ys = np.asarray(poly.exterior.coords).T
        rr, cc = fill_polygon(ys - 0.5, xs - 0.5, shape=rgb.shape[:2])
        ref[i] = dab_sk[rr, cc].mean() if rr.size else np.nan
    ours = cells.measurements["Nucleus: DAB OD mean"]
    ok = np.isfinite(ref)
    b_ours, b_ref = intensity_bins(ours[ok], THRESHOLDS), intensity_bins(ref[ok], THRESHOLDS)
    return {
        "cells": int(ok.sum()),
        "pearson_r": float(np.corrcoef(ours[ok], ref[ok])[0, 1]),
        "median_ratio_ref_over_ours": float(np.median(ref[ok] / np.maximum(ours[ok], 1e-6))),
        "positive_call_agreement": float(((b_ours > 0) == (b_ref > 0)).mean()),
        "bin_agreement": float((b_ours == b_ref).mean()),
        "positive_pct_ours": float(100 * (b_ours > 0).mean()),
        "positive_pct_ref": float(100 * (b_ref > 0).mean()),
    }


def public(name: str, rgb: np.ndarray, mpp: float) -> list[dict[str, Any]]:
    settings: list[tuple[str, CellDetectionParams, Any, tuple[float, float, float]]] = [
        ("default", CellDetectionParams(), QUPATH_H_DAB, THRESHOLDS),
        ("estimated stains", CellDetectionParams(), estimate_stains(rgb), THRESHOLDS),
        (
            "od_sum detection",
            CellDetectionParams(detection_image="od_sum"),
            QUPATH_H_DAB,
            THRESHOLDS,
        ),
        ("thresholds -0.05", CellDetectionParams(), QUPATH_H_DAB, (0.15, 0.35, 0.55)),
        ("thresholds +0.05", CellDetectionParams(), QUPATH_H_DAB, (0.25, 0.45, 0.65)),
    ]
    rows = []
    for label, params, stains, thr in settings:
        # what `simsearch-wsi quantify` runs: tiles with a halo, the requested pixel size
        img = ArraySource(rgb, mpp=mpp)
        cells = detect_cells(img, params=params, stains=stains, with_geometry=False)
        rule = PositivityRule(thresholds=thr)
        (s,), _ = score_regions(cells, [Region("Image")], rule=rule, mpp=mpp)
        rows.append(
            {
                "image": name,
                "setting": label,
                "cells": s.n_cells,
                "positive_pct": s.positive_pct,
                "h_score": s.h_score,
                "pct_1_2_3": (s.pct_1plus, s.pct_2plus, s.pct_3plus),
            }
        )
    return rows


def speed() -> list[dict[str, Any]]:
    import time

    f = make_ihc_cell_field((4096, 4096), dab_levels=(0.05, 0.3, 0.5, 0.8), seed=0)
    img = ArraySource(f.rgb, mpp=0.5)
    rows = []
    for outlines in (False, True):
        t0 = time.perf_counter()
        cells = detect_cells(img, with_geometry=outlines)
        dt = time.perf_counter() - t0
        rows.append(
            {
                "outlines": outlines,
                "cells": len(cells),
                "seconds": dt,
                "MP_per_s": f.rgb.shape[0] * f.rgb.shape[1] / 1e6 / dt,
            }
        )
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, tuple):
        return " / ".join(_fmt(x) for x in v)
    return str(v)


def _table(rows: list[dict[str, Any]]) -> None:
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "../shared/data"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--speed", action="store_true", help="also time detection on 16.8 MP")
    args = ap.parse_args()
    out: dict[str, Any] = {"synthetic": synthetic(range(5))}
    _table(out["synthetic"])
    data = Path(args.data)
    ihc = data / "brightfield" / "skimage_ihc.png"
    os1 = data / "brightfield" / "bankhead2022_OS-1-detail.ome.tif"
    if ihc.is_file():
        from PIL import Image

        rgb = np.asarray(Image.open(ihc).convert("RGB"))
        out["reference"] = reference(rgb, 0.5)
        _table([out["reference"]])
        out["public"] = public("skimage_ihc (mpp 0.5 assumed)", rgb, 0.5)
    if os1.is_file():
        from simsearch_wsi.io import open_image

        with open_image(os1) as img:
            w, h = img.dimensions
            rgb = np.ascontiguousarray(img.read_region((0, 0), 0, (w, h))[..., :3])
            mpp = float(img.mpp or 0.227)
        out.setdefault("public", []).extend(public("OS-1 H&E (negative control)", rgb, mpp))
    if "public" in out:
        _table(out["public"])
    if args.speed:
        out["speed"] = speed()
        _table(out["speed"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
