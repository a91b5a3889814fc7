"""The ablation's report: per-run rows, mean and std over repeats, a Markdown table, a figure.

Files (written atomically):

``runs.csv``
    one row per run and class: strategy, P, N, repeat, seed, class, PR-AUC (``ap``), counts,
    IoU, what the simulated user labelled and seconds;
``summary.csv``
    one row per (strategy, P, N): mean and sample std over repeats of the mean PR-AUC over
    classes (``map``), of each class's PR-AUC and of the mean IoU;
``summary.md``
    the same as a Markdown table (what ``docs/evaluation.md`` quotes);
``pr_auc.png``
    mean PR-AUC per strategy with std error bars, one group per (P, N), one panel per class
    plus the mean over classes, like the paper's ablation figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from simsearch_wsi.core.atomic import atomic_path, write_text_atomic
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.eval.ablation import RunResult
from simsearch_wsi.infer.quantify import write_table

__all__ = ["SummaryRow", "mean_std", "run_rows", "summarize", "summary_markdown", "write_report"]

_DPI = 110


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof 1; 0 for one value) and count of the non-NaN
    ``values``; (NaN, NaN, 0) when there are none."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def run_rows(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per run and class (``runs.csv``)."""
    rows: list[dict[str, Any]] = []
    for r in results:
        s = r.spec
        for c in r.scores:
            rows.append(
                {
                    "strategy": s.strategy,
                    "P": s.prototypes,
                    "N": s.negatives,
                    "repeat": s.repeat,
                    "seed": s.seed,
                    "class": c.class_name,
                    "ap": c.ap,
                    "iou": c.iou,
                    "n_true": c.n_true,
                    "n_pred": c.n_pred,
                    "n_tp": c.n_tp,
                    "approved": r.review.get("approved", {}).get(c.class_name),
                    "flagged": r.review.get("flagged", {}).get(c.class_name),
                    "threshold": r.review.get("thresholds", {}).get(c.class_name),
                    "background": r.review.get("background"),
                    "seconds_train": r.seconds.get("train"),
                    "seconds_score": r.seconds.get("score"),
                }
            )
    return rows


#: a row of ``summary.csv``: strategy, P, N, repeats, map_mean, map_std, ap_<class>_mean, ...
SummaryRow = dict[str, Any]


def summarize(results: Sequence[RunResult], classes: Sequence[str]) -> list[SummaryRow]:
    """Mean and std over repeats per (strategy, P, N), in the order first run."""
    groups: dict[tuple[str, int, int], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.spec.strategy, r.spec.prototypes, r.spec.negatives), []).append(r)
    out: list[SummaryRow] = []
    for (strategy, p, n), runs in groups.items():
        row: SummaryRow = {"strategy": strategy, "P": p, "N": n, "repeats": len(runs)}
        m, sd, _ = mean_std([r.mean_ap for r in runs])
        row["map_mean"], row["map_std"] = m, sd
        for c in classes:
            aps = [next((s.ap for s in r.scores if s.class_name == c), math.nan) for r in runs]
            row[f"ap_{c}_mean"], row[f"ap_{c}_std"], _ = mean_std(aps)
        m, sd, _ = mean_std([r.mean_iou for r in runs])
        row["miou_mean"], row["miou_std"] = m, sd
        out.append(row)
    return out


def _pm(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def summary_markdown(rows: Sequence[SummaryRow], classes: Sequence[str]) -> str:
    """A Markdown table: strategy, P, N, repeats, mean PR-AUC, per-class PR-AUC, mean IoU."""
    head = ["strategy", "P", "N", "repeats", "PR-AUC (mean of classes)"]
    head += [f"PR-AUC {c}" for c in classes] + ["IoU (mean of classes)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["strategy"]), str(r["P"]), str(r["N"]), str(r["repeats"])]
        cells.append(_pm(r["map_mean"], r["map_std"]))
        cells += [_pm(r[f"ap_{c}_mean"], r[f"ap_{c}_std"]) for c in classes]
        cells.append(_pm(r["miou_mean"], r["miou_std"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_pr_auc(rows: Sequence[SummaryRow], classes: Sequence[str]) -> Figure:
    """Bars of mean PR-AUC (std error bars) per strategy, grouped by (P, N); one panel per
    class and one for the mean over classes."""
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    settings = list(dict.fromkeys((r["P"], r["N"]) for r in rows))
    panels = [("mean of classes", "map")] + [(c, f"ap_{c}") for c in classes]
    fig = Figure(figsize=(3.2 * len(panels), 3.4), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    width = 0.8 / max(len(strategies), 1)
    x = np.arange(len(settings))
    cmap = [f"C{k}" for k in range(10)]
    by_key = {(r["strategy"], r["P"], r["N"]): r for r in rows}
    for ax, (title, col) in zip(axes, panels, strict=True):
        for k, s in enumerate(strategies):
            means = [by_key.get((s, p, n), {}).get(f"{col}_mean", math.nan) for p, n in settings]
            stds = [by_key.get((s, p, n), {}).get(f"{col}_std", math.nan) for p, n in settings]
            ax.bar(
                x + (k - (len(strategies) - 1) / 2) * width,
                np.nan_to_num(means),
                width,
                yerr=np.nan_to_num(stds),
                capsize=2,
                label=s,
                color=cmap[k % len(cmap)],
            )
        ax.set_xticks(x, [f"P={p}\nN={n}" for p, n in settings])
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("PR-AUC (mean ± std over repeats)")
    axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def write_report(
    results: Sequence[RunResult], classes: Sequence[str], *, out_dir: Path
) -> dict[str, Path]:
    """Write the files of the module docstring into ``out_dir``; returns them by role."""
    if not results:
        raise ConfigError(f"{out_dir}: no finished runs to report; run the ablation first")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(results, classes)
    files = {
        "runs": write_table(out_dir / "runs.csv", run_rows(results)),
        "summary": write_table(out_dir / "summary.csv", rows),
        "table": write_text_atomic(out_dir / "summary.md", summary_markdown(rows, classes)),
    }
    fig = plot_pr_auc(rows, classes)
    png = out_dir / "pr_auc.png"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight")
    files["figure"] = png
    return files
