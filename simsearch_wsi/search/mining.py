"""Mining training patches the user has not labelled, with the similarity search.

* **Noisy positives** (SimSearch's "noisy data"): on images the user has not reviewed, the
  windows the search would suggest with the session's prototypes and thresholds, i.e. local maxima
  of each class map above its threshold, best first.
* **Mined background**: embedded windows that no class reaches its threshold on, away from
  everything labelled and every mined positive, drawn at random (seeded). They stand in for the
  background class when the user confirmed little or no background.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.features.extractor import ProgressFn
from simsearch_wsi.io.base import ImageSource
from simsearch_wsi.search.engine import SimSearch
from simsearch_wsi.search.similarity import (
    Prototype,
    Suggestion,
    extract_suggestions,
    windows_near,
)


@dataclass
class MinedPatches:
    """Mined on one image: ``noisy`` (class, centre_l0, similarity) and background centres."""

    image: str
    noisy: list[tuple[str, tuple[float, float], float]] = field(default_factory=list)
    background: list[tuple[float, float]] = field(default_factory=list)


def mine_image(
    search: SimSearch,
    image: ImageSource,
    *,
    prototypes: Sequence[Prototype],
    thresholds: dict[str, float],
    patch_size_l0: tuple[float, float],
    avoid: Sequence[BoxL0] = (),
    n_per_class: int = 64,
    n_background: int = 64,
    rng: np.random.Generator,
    progress: ProgressFn | None = None,
) -> MinedPatches:
    """Noisy positives (up to ``n_per_class`` per class, best first) and ``n_background``
    random background windows of ``image``, none overlapping ``avoid`` (labelled) boxes."""
    sim = search.similarity(image, prototypes, patch_size_l0=patch_size_l0, progress=progress)
    classes, geometry, spec = sim.classes, sim.geometry, sim.spec
    mined = MinedPatches(str(image.path))
    taken: list[Suggestion] = []
    if n_per_class > 0:
        suggestions = extract_suggestions(
            sim.maps,
            classes,
            geometry=geometry,
            spec=spec,
            thresholds={c: thresholds[c] for c in classes},
            min_distance_a=geometry.width_a,
            max_per_class=n_per_class,
            exclude=sim.here,
            image_size_l0=image.dimensions,
            # strictly above: an inclusive rule changes which windows are mined, and a trained
            # model's acceptance bars (tests/test_predict.py) were measured with this one
            inclusive=False,
        )
        taken = [s for s in suggestions if not any(b.intersects(s.box) for b in avoid)]
        mined.noisy = [(s.class_name, s.box.center_l0, s.similarity) for s in taken]
    if n_background > 0:
        maps = sim.maps[: len(classes)]
        thr = np.asarray([thresholds[c] for c in classes], dtype=np.float32)[:, None, None]
        finite = np.isfinite(maps).all(axis=0)
        below = (np.where(np.isfinite(maps), maps, np.inf) < thr).all(axis=0)
        eligible: NDArray[np.bool_] = np.asarray(finite & below, dtype=bool)
        near = [*avoid, *(p.box for p in sim.here), *(t.box for t in taken)]
        eligible &= ~windows_near(eligible.shape, near, geometry=geometry, spec=spec)
        cells = np.argwhere(eligible)
        if len(cells):
            pick = rng.choice(len(cells), size=min(n_background, len(cells)), replace=False)
            for i, j in cells[np.sort(pick)]:
                cx_a, cy_a = geometry.window_center_a(float(i), float(j))
                mined.background.append(
                    (cx_a * spec.scale.downsample_x, cy_a * spec.scale.downsample_y)
                )
    return mined
