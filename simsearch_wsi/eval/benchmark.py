"""Evaluation datasets: images with ground truth, split by what the simulated user sees.

A :class:`Benchmark` has three roles of images, as in the paper's protocol:

``review``
    shown to the simulated user: prototypes are picked from their ground truth and the user
    labels the search's suggestions there;
``unlabelled``
    images the user never sees (no truth needed): self-learning mines its noisy patches there;
``test``
    held out: the trained model (or the search alone) is scored there.

Benchmarks come from a CSV manifest (:func:`read_benchmark_csv`: columns ``image``, ``role``,
``truth``, optional ``mpp``) or are generated (:func:`synthetic_benchmark`: seeded synthetic
H&E-like slides with three motif classes, the truth written next to them as CSV).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simsearch_wsi.core.atomic import write_json_atomic
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.tables import csv_errors
from simsearch_wsi.eval.truth import GroundTruth, read_truth, read_truth_csv
from simsearch_wsi.eval.user import TruthImage

__all__ = [
    "ROLES",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_DISTRACTORS",
    "SYNTHETIC_MASK_DOWNSAMPLE",
    "Benchmark",
    "read_benchmark_csv",
    "synthetic_benchmark",
]

ROLES = ("review", "unlabelled", "test")
#: the motif classes of synthetic benchmarks, and their look-alikes (stamped, never scored)
SYNTHETIC_CLASSES = ("ring", "cluster", "stripes")
SYNTHETIC_DISTRACTORS = ("disc", "doublet", "crosshatch")
#: level-0 pixels per pixel of the box masks synthetic test truth gets (segmentation IoU)
SYNTHETIC_MASK_DOWNSAMPLE = 4.0


@dataclass(frozen=True)
class Benchmark:
    """Images by role (module docstring), the classes scored and the experiment's patch size
    (level-0 pixels, the square the simulated user draws)."""

    name: str
    classes: tuple[str, ...]
    patch_size_l0: float
    review: tuple[TruthImage, ...]
    unlabelled: tuple[Path, ...]
    test: tuple[TruthImage, ...]

    def __post_init__(self) -> None:
        if not self.review or not self.test:
            raise ConfigError(
                f"benchmark {self.name!r} needs at least one review and one test image "
                f"(has {len(self.review)} review, {len(self.test)} test)"
            )
        if not (math.isfinite(self.patch_size_l0) and self.patch_size_l0 > 0):
            raise ConfigError(f"patch size must be > 0 level-0 pixels, got {self.patch_size_l0}")
        if not self.classes:
            raise ConfigError(f"benchmark {self.name!r} has no classes to score")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (paths and object counts)."""

        def image(t: TruthImage) -> dict[str, Any]:
            out: dict[str, Any] = {"path": str(t.path), "objects": t.truth.counts(), "mpp": t.mpp}
            if t.truth.mask is not None:
                out["mask_downsample"] = list(t.truth.mask_downsample)
            return out

        return {
            "name": self.name,
            "classes": list(self.classes),
            "patch_size_l0": self.patch_size_l0,
            "review": [image(t) for t in self.review],
            "unlabelled": [str(p) for p in self.unlabelled],
            "test": [image(t) for t in self.test],
        }

    def digest(self) -> str:
        """A short hash of the description and of the images' and truth files' identities
        (size, mtime): a finished run is reused only on the same benchmark."""
        h = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode())
        files: list[str | Path] = [*(t.path for t in self.review), *self.unlabelled]
        files += [t.path for t in self.test]
        files += [
            s for t in (*self.review, *self.test) if (s := t.truth.source) and Path(s).is_file()
        ]
        for p in files:
            st = Path(p).stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def read_benchmark_csv(
    path: str | os.PathLike[str],
    *,
    patch_size_l0: float,
    classes: Sequence[str] | None = None,
    mask_downsample: float = 1.0,
) -> Benchmark:
    """A benchmark from a CSV manifest: one row per image with ``image``, ``role`` (review,
    unlabelled or test), ``truth`` (a CSV, GeoJSON or label-mask file; empty for unlabelled
    images) and optionally ``mpp``. Relative paths are relative to the manifest. ``classes``
    picks and orders the classes scored (required for label masks: the class of label 1, 2,
    ...); default: the classes of the first review image's truth. ``mask_downsample`` is the
    level-0 pixels per pixel of label-mask truth."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: benchmark manifest not found; give a CSV with image,role,truth")
    with csv_errors(p, "benchmark manifest"), p.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"image", "role"} <= set(rows[0]):
        raise ConfigError(f"{p}: the manifest needs a header with image and role (and truth)")
    by_role: dict[str, list[Any]] = {r: [] for r in ROLES}
    for n, row in enumerate(rows, start=2):
        role = (row.get("role") or "").strip().lower()
        if role not in ROLES:
            raise ConfigError(f"{p}, line {n}: role {role!r}; use one of {', '.join(ROLES)}")
        image = _resolve(p.parent, (row.get("image") or "").strip())
        if not image.exists():
            raise ConfigError(f"{p}, line {n}: image {image} not found")
        if role == "unlabelled":
            by_role[role].append(image)
            continue
        truth_value = (row.get("truth") or "").strip()
        if not truth_value:
            raise ConfigError(f"{p}, line {n}: a {role} image needs a truth file")
        mpp_text = (row.get("mpp") or "").strip()
        try:
            mpp = float(mpp_text) if mpp_text else None
        except ValueError:
            raise ConfigError(f"{p}, line {n}: mpp {mpp_text!r} is not a number") from None
        truth = read_truth(
            _resolve(p.parent, truth_value), classes=classes, downsample=mask_downsample
        )
        by_role[role].append(TruthImage(image, truth, mpp))
    first = by_role["review"][0].truth.classes if by_role["review"] else ()
    names = tuple(classes) if classes else first
    return Benchmark(
        name=p.stem,
        classes=names,
        patch_size_l0=float(patch_size_l0),
        review=tuple(by_role["review"]),
        unlabelled=tuple(by_role["unlabelled"]),
        test=tuple(by_role["test"]),
    )


def _synthetic_params(
    seed: int,
    n_review: int,
    n_unlabelled: int,
    n_test: int,
    size: tuple[int, int],
    n_per_class: int,
    distractors: bool,
    stain_jitter: float,
) -> dict[str, Any]:
    return {
        "kind": "synthetic",
        "version": 2,
        "distractors": distractors,
        "stain_jitter": stain_jitter,
        "seed": seed,
        "n_review": n_review,
        "n_unlabelled": n_unlabelled,
        "n_test": n_test,
        "size": list(size),
        "n_per_class": n_per_class,
    }


def synthetic_benchmark(
    root: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_review: int = 2,
    n_unlabelled: int = 1,
    n_test: int = 2,
    size: tuple[int, int] = (2048, 1536),
    n_per_class: int = 12,
    distractors: bool = True,
    stain_jitter: float = 0.15,
) -> Benchmark:
    """Seeded synthetic H&E-like slides (``ring``, ``cluster``, ``stripes`` motifs of about 48
    px on mottled tissue; :func:`~simsearch_wsi.synthetic.make_synthetic_slide`) under
    ``root``, with their truth as CSV; test images also get a box mask for segmentation IoU.

    With ``distractors``, as many look-alikes of each class (a filled disc, a doublet of
    nuclei, crossed stripes) are stamped too: they are not objects of any scored class, so a
    suggestion on one is wrong and the simulated user flags it. ``stain_jitter`` varies each
    slide's stain strength per channel (technical noise between slides). Slides already
    written with the same parameters are reused (their feature caches stay valid)."""
    from simsearch_wsi.synthetic import make_synthetic_slide

    out = Path(root)
    params = _synthetic_params(
        seed, n_review, n_unlabelled, n_test, size, n_per_class, distractors, stain_jitter
    )
    record = out / "benchmark.json"
    roles = ["review"] * n_review + ["unlabelled"] * n_unlabelled + ["test"] * n_test
    names = [f"{role}{k}" for role in ROLES for k in range(roles.count(role))]
    files = [(out / f"{n}.tiff", out / f"{n}.truth.csv") for n in names]
    previous: dict[str, Any] = {}
    if record.is_file():
        try:
            previous = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            previous = {}
    if previous.get("params") != params or not all(a.exists() and b.exists() for a, b in files):
        out.mkdir(parents=True, exist_ok=True)
        for k, (image, truth_path) in enumerate(files):
            slide = make_synthetic_slide(
                image,
                width=size[0],
                height=size[1],
                classes=SYNTHETIC_CLASSES + (SYNTHETIC_DISTRACTORS if distractors else ()),
                n_per_class=n_per_class,
                seed=seed * 100 + k,
                stain_jitter=stain_jitter,
            )
            slide.to_csv(truth_path)
        write_json_atomic(record, {"params": params, "images": [str(a) for a, _ in files]})
    review: list[TruthImage] = []
    unlabelled: list[Path] = []
    test: list[TruthImage] = []
    for role, (image, truth_csv) in zip(roles, files, strict=True):
        truth: GroundTruth = read_truth_csv(truth_csv, classes=SYNTHETIC_CLASSES)
        if role == "review":
            review.append(TruthImage(image, truth))
        elif role == "unlabelled":
            unlabelled.append(image)
        else:
            test.append(TruthImage(image, truth.with_box_mask(size, SYNTHETIC_MASK_DOWNSAMPLE)))
    return Benchmark(
        name=f"synthetic-seed{seed}" + ("-distractors" if distractors else ""),
        classes=SYNTHETIC_CLASSES,
        patch_size_l0=48.0,
        review=tuple(review),
        unlabelled=tuple(unlabelled),
        test=tuple(test),
    )
