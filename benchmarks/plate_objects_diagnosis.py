"""Where the object candidates lose PR-AUC on the search suite's plates (issue 18): detection
(true cells without a candidate, merged or split cells) or ranking (a cell suggested for the
wrong class, or ranked low), and which part of the vector ranks well.

For every plate (``--cases``: ``plate`` and extra dev plates ``plate@SEED``), P and draw of
:mod:`search_suite` (the same prototypes), the default search is run on each test field and its
object candidates are recorded: their boxes, their class similarities and their vectors. Each
true cell is matched to the nearest unmatched object centre within the suite's radius (closest
pairs first). Reported per plate (pooled over P, draws and test fields):

* ``grid_fields``: the fraction of (P, draw, field) searches where ``auto`` took the grid
  (left out of the other figures);
* ``recall_det``: true cells with an object; ``merged``: objects whose box holds >= 2 true
  centres; ``extra``: objects matched to no cell;
* ``acc``: matched cells whose most similar class (the class they are suggested for) is theirs;
  by cell diameter (``acc_small`` < 25 px, ``acc_large`` > 50 px);
* PR-AUC (mean over classes) of rankings of the objects: ``argmax`` (the search's: each object
  suggested once, for its most similar class), ``all`` (every object ranked for every class),
  and ``argmax`` with the similarity of the reporter block alone (``rep``, the first channel's
  256 dimensions) or the DNA block alone (``dna``), with each block normalised on its own
  (``blocks``: equal weights) or with the prototypes' channel weights (``weighted``,
  :func:`channel_weights`, tried and not kept; ``weight_reporter``: the reporter's);
  ``reporter_norm_share``: the share of a candidate vector's squared norm in the reporter block.

    .venv/bin/python benchmarks/plate_objects_diagnosis.py --out bench_output/h18 \
        --cases plate,plate@411,plate@412,plate@413 --threads 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import search_suite as suite
import torch
import torch.nn.functional as F

from simsearch_wsi.eval.metrics import average_precision
from simsearch_wsi.eval.user import NO_THRESHOLD
from simsearch_wsi.features.backbones import build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import FeatureExtractor
from simsearch_wsi.io import open_image
from simsearch_wsi.search import objects as object_rule
from simsearch_wsi.search.engine import SimSearch


def _match(true_xy: np.ndarray, obj_xy: np.ndarray, radius: float) -> dict[int, int]:
    """true index -> object index, closest pairs first, one-to-one, within ``radius``."""
    if not len(true_xy) or not len(obj_xy):
        return {}
    d = np.hypot(*(true_xy[:, None, :] - obj_xy[None, :, :]).transpose(2, 0, 1))
    out: dict[int, int] = {}
    used: set[int] = set()
    for flat in np.argsort(d, axis=None):
        i, j = np.unravel_index(flat, d.shape)
        if d[i, j] > radius:
            break
        if int(i) in out or int(j) in used:
            continue
        out[int(i)] = int(j)
        used.add(int(j))
    return out


def _ap(scores: np.ndarray, tp: np.ndarray, n_true: int) -> float:
    order = np.argsort(-scores, kind="stable")
    return average_precision(tp[order], n_true)


def channel_weights(
    prototype_vectors: torch.Tensor,
    class_index: torch.Tensor,
    candidate_vectors: torch.Tensor,
    n_channels: int,
) -> torch.Tensor:
    """(n_channels,) weights of the channels' blocks of dimensions (channel-major, ``D / n``
    each; merge_channel_features), summing to
    ``n_channels``: how much further apart the prototypes of different classes are in a block
    than two objects of the image are on average, ``max(0, between / typical - 1)``.

    ``between``: the mean squared distance of the block between prototype vectors
    ((P, D), ``class_index`` (P,)) of different classes; ``typical``: that of two candidate
    vectors ((N, D)), ``2 x`` their summed variance. A block where the prototypes' classes differ
    no more than any two objects do (a channel that does not show the classes) gets 0. Equal
    weights (ones) with one channel, one class, fewer than two candidates, or when no block
    separates the classes."""
    ones = torch.ones(n_channels, dtype=torch.float32)
    d = prototype_vectors.shape[1]
    if n_channels < 2 or d % n_channels or len(candidate_vectors) < 2:
        return ones
    diff = class_index[:, None] != class_index[None, :]
    if not bool(diff.any()):
        return ones
    width = d // n_channels
    out = torch.zeros(n_channels, dtype=torch.float32)
    for c in range(n_channels):
        p = prototype_vectors[:, c * width : (c + 1) * width].float()
        q = candidate_vectors[:, c * width : (c + 1) * width].float()
        between = float((torch.cdist(p, p) ** 2)[diff].mean())
        typical = 2.0 * float(q.var(dim=0, unbiased=False).sum())
        out[c] = max(0.0, between / typical - 1.0) if typical > 0 else 0.0
    total = float(out.sum())
    return out * (n_channels / total) if total > 0 else ones


def weight_channels(vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, D) unit vectors with each channel's block (``D / len(weights)`` dimensions) scaled by
    the square root of its weight and renormalised: their cosine weights the blocks' dot
    products."""
    n = len(weights)
    scaled = vectors.reshape(len(vectors), n, -1) * weights.sqrt()[None, :, None]
    out: torch.Tensor = F.normalize(scaled.reshape(len(vectors), -1), dim=1)
    return out


def _unit(v: torch.Tensor) -> torch.Tensor:
    return F.normalize(v, dim=1)


def _blocks(v: torch.Tensor) -> torch.Tensor:
    """(N, D) -> each of the two channel blocks of unit length on its own."""
    return F.normalize(v.reshape(len(v), 2, -1), dim=2).reshape(len(v), -1)


def _class_max(sims: torch.Tensor, owners: torch.Tensor, k: int) -> np.ndarray:
    """(N, P) object-prototype similarities -> (N, k) the maximum over each class's."""
    s = sims.numpy()
    out = np.full((s.shape[0], k), -np.inf)
    for c in range(k):
        cols = (owners == c).numpy()
        if cols.any():
            out[:, c] = s[:, cols].max(axis=1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_output/search_suite"))
    parser.add_argument("--cases", default="plate")
    parser.add_argument("--prototypes", default="1,2,5")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--objects-set", default="")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    suite.set_object_constants(args.objects_set)
    cases = suite.build_cases(args.out / "data-dev", "dev", args.cases.split(","), quick=False)
    trunk, bspec, info = build_trunk("resnet18-l3", "embedded", seed=0)
    extractor = FeatureExtractor(trunk, bspec, info, device=torch.device("cpu"))
    search = SimSearch(
        extractor, FeatureCache(args.out / "cache"), settings=suite.CONFIGS["default"]
    )
    seen: list[Any] = []
    original = object_rule.ObjectCandidates.suggestions

    def record(self: Any, vectors: Any, **kw: Any) -> Any:
        seen.append((self, vectors))
        return original(self, vectors, **kw)

    object_rule.ObjectCandidates.suggestions = record  # type: ignore[method-assign]
    report: dict[str, Any] = {}
    for case in cases:
        k = len(case.classes)
        stats: dict[str, list[float]] = {}
        per_run: dict[str, list[list[float]]] = {}
        for p in [int(v) for v in args.prototypes.split(",")]:
            for d in range(args.draws):
                seed = suite.SEEDS["dev"][case.name] if case.seed is None else case.seed
                protos = suite.draw_prototypes(case, p, np.random.default_rng([seed, p, d]))
                # per class: (scores argmax, tp, scores all, tp all, rep, dna) pooled over fields
                pooled: dict[str, dict[int, list[np.ndarray]]] = {
                    v: {c: [] for c in range(k)} for v in ("s", "t", "sa", "ta", "sr", "tr")
                }
                pooled |= {
                    v: {c: [] for c in range(k)} for v in ("sd", "td", "sw", "tw", "sb", "tb")
                }
                n_true = np.zeros(k, dtype=int)
                for t in case.test:
                    seen.clear()
                    with open_image(t.path) as img:
                        search.suggest(
                            img,
                            protos,
                            thresholds=dict.fromkeys(case.classes, NO_THRESHOLD),
                            open_image=lambda q: open_image(q),
                        )
                    if not seen:  # auto took the grid: counted, left out of the figures
                        stats.setdefault("grid_fields", []).append(1.0)
                        continue
                    stats.setdefault("grid_fields", []).append(0.0)
                    found, (vecs, owners) = seen[-1]
                    boxes = found.boxes
                    obj_xy = np.array([b.center_l0 for b in boxes], dtype=float).reshape(-1, 2)
                    true_xy = np.concatenate([t.truth.centres(c) for c in case.classes])
                    true_c = np.concatenate(
                        [np.full(t.truth.n_objects(c), i) for i, c in enumerate(case.classes)]
                    )
                    diam = np.concatenate([t.truth.boxes(c)[:, 2] for c in case.classes])
                    n_true += np.bincount(true_c, minlength=k)
                    m = _match(true_xy, obj_xy, case.radius_l0)
                    obj_c = np.full(len(boxes), -1)
                    for i, j in m.items():
                        obj_c[j] = true_c[i]
                    merged = sum(
                        sum(b.contains_point(x, y) for x, y in true_xy) >= 2 for b in boxes
                    )
                    sim = found.class_similarity((vecs, owners))
                    best = sim.argmax(axis=1)
                    cv = found.candidate_vectors
                    half = cv.shape[1] // 2

                    sr = _class_max(_unit(cv[:, :half]) @ _unit(vecs[:, :half]).T, owners, k)
                    sd = _class_max(_unit(cv[:, half:]) @ _unit(vecs[:, half:]).T, owners, k)
                    w = channel_weights(vecs, owners, cv, 2)
                    stats.setdefault("weight_reporter", []).append(float(w[0]))
                    share = (cv[:, :half] ** 2).sum(dim=1) / (cv**2).sum(dim=1)
                    stats.setdefault("reporter_norm_share", []).append(float(share.mean()))
                    sw = _class_max(weight_channels(cv, w) @ weight_channels(vecs, w).T, owners, k)
                    sb = _class_max(_blocks(cv) @ _blocks(vecs).T, owners, k)
                    for c in range(k):
                        mine = best == c
                        pooled["s"][c].append(sim[mine, c])
                        pooled["t"][c].append(obj_c[mine] == c)
                        pooled["sa"][c].append(sim[:, c])
                        pooled["ta"][c].append(obj_c == c)
                        for key, s in (("r", sr), ("d", sd), ("w", sw), ("b", sb)):
                            sel = s.argmax(axis=1) == c
                            pooled["s" + key][c].append(s[sel, c])
                            pooled["t" + key][c].append(obj_c[sel] == c)
                    matched = np.array(sorted(m))
                    ok = (
                        best[[m[i] for i in matched]] == true_c[matched]
                        if len(matched)
                        else np.zeros(0, bool)
                    )
                    small, large = diam[matched] < 25, diam[matched] > 50
                    for name, value in (
                        ("recall_det", len(m) / len(true_xy)),
                        ("merged", float(merged)),
                        ("extra", float(len(boxes) - len(m))),
                        ("acc", float(ok.mean())),
                        ("acc_small", float(ok[small].mean()) if small.any() else np.nan),
                        ("acc_large", float(ok[large].mean()) if large.any() else np.nan),
                    ):
                        stats.setdefault(name, []).append(value)
                if not n_true.any():  # every field took the grid
                    continue
                for v, (sk, tk) in {
                    "argmax": ("s", "t"),
                    "all": ("sa", "ta"),
                    "rep": ("sr", "tr"),
                    "dna": ("sd", "td"),
                    "weighted": ("sw", "tw"),
                    "blocks": ("sb", "tb"),
                }.items():
                    aps = [
                        _ap(
                            np.concatenate(pooled[sk][c]),
                            np.concatenate(pooled[tk][c]),
                            int(n_true[c]),
                        )
                        for c in range(k)
                    ]
                    per_run.setdefault(v, []).append(aps)
        row = {n: float(np.nanmean(v)) for n, v in stats.items()}
        for v, runs in per_run.items():
            row[f"ap_{v}"] = float(np.mean(runs))
            row[f"ap_{v}_per_class"] = [float(x) for x in np.mean(runs, axis=0)]
        report[case.name] = row
        print(
            case.name,
            json.dumps({n: round(x, 3) if isinstance(x, float) else x for n, x in row.items()}),
            flush=True,
        )
    (args.out / "plate_diagnosis.json").write_text(json.dumps(report, indent=1), "utf-8")


if __name__ == "__main__":
    main()
