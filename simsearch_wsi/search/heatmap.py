"""Per-class similarity heat maps, aligned to the slide's level-0 pixels.

The search's similarity maps are (K, Hp, Wp) over pooled windows on the analysis grid (window
(i, j) centred at ``PatchGeometry.window_center_a(i, j)``). A heat map resamples them onto a grid
whose origin is the slide's level-0 origin: heat-map pixel (v, u) covers level-0 pixels
``[u * downsample, (u + 1) * downsample) x [v * downsample, (v + 1) * downsample)`` and takes the
value of the window whose centre is nearest to that square's centre (nearest neighbour, ties to
the next window: values are the search's own, none interpolated; a window's centre lies within
a pixel of its heat-map pixel). So a heat-map pixel maps to the slide by a scale only::

    x_l0 = (u + 0.5) * downsample        y_l0 = (v + 0.5) * downsample

The default downsample is the windows' pitch on level 0 (the trunk's stride times the analysis
downsample), the finest grid that still shows every window. The heat maps are the raw class
similarities (cosine, [-1, 1]), before the competition between classes that suggestions go
through; NaN where the slide was not embedded (background tiles).

``heatmap_png`` encodes one class as an 8-bit grey + alpha PNG: grey = round(255 * clip(s, 0, 1)),
alpha 0 where NaN and 255 elsewhere, the same size as the heat map (so the PNG pixel (u, v) is the
heat-map pixel above).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.features.extractor import FeatureSpec
from simsearch_wsi.search.similarity import PatchGeometry

__all__ = ["HeatMap", "heatmap_l0", "heatmap_png"]

#: a heat map larger than this (pixels per class) is refused; pass a coarser ``downsample``
MAX_HEATMAP_PIXELS = 64 * 2**20


@dataclass(frozen=True)
class HeatMap:
    """Similarity heat maps of one image on a level-0 aligned grid (module docstring).

    ``values``: (K, H, W) float32 cosine similarities, NaN where not embedded; ``downsample``:
    level-0 pixels per heat-map pixel (x and y); ``image_size_l0``: (width, height) of the
    slide; ``mpp``: the slide's level-0 micrometres per pixel, when known."""

    classes: tuple[str, ...]
    values: NDArray[np.float32]
    downsample: float
    image_size_l0: tuple[int, int]
    mpp: float | None = None

    def of(self, name: str) -> NDArray[np.float32]:
        """(H, W) heat map of class ``name``."""
        if name not in self.classes:
            raise ConfigError(f"no heat map for class {name!r}; classes: {list(self.classes)}")
        out: NDArray[np.float32] = self.values[self.classes.index(name)]
        return out

    def value_at_l0(self, name: str, x_l0: float, y_l0: float) -> float:
        """The class's heat-map value at a level-0 point (NaN outside the slide)."""
        h, w = self.values.shape[1:]
        u, v = math.floor(x_l0 / self.downsample), math.floor(y_l0 / self.downsample)
        if not (0 <= u < w and 0 <= v < h):
            return math.nan
        return float(self.of(name)[v, u])

    def metadata(self) -> dict[str, Any]:
        """What a reader needs to place the images on the slide (JSON-ready)."""
        h, w = self.values.shape[1:]
        return {
            "classes": list(self.classes),
            "downsample": self.downsample,
            "width": int(w),
            "height": int(h),
            "image_size_l0": list(self.image_size_l0),
            "mpp": self.mpp,
            "pixel_size_um": None if self.mpp is None else self.mpp * self.downsample,
            "encoding": "PNG, grey = round(255 * clip(similarity, 0, 1)), alpha 0 = not embedded",
            "origin_l0": [0.0, 0.0],
        }


def heatmap_l0(
    maps: NDArray[np.float32],
    classes: Sequence[str],
    *,
    geometry: PatchGeometry,
    spec: FeatureSpec,
    image_size_l0: tuple[int, int],
    downsample: float | None = None,
    mpp: float | None = None,
) -> HeatMap:
    """The first ``len(classes)`` maps of ``maps`` (K [+1], Hp, Wp) on a level-0 aligned grid.

    ``downsample``: level-0 pixels per heat-map pixel (default: the windows' pitch on level 0,
    ``geometry.stride * spec.scale.downsample_x``). Each heat-map pixel takes the window whose
    centre is nearest to its centre; pixels past the outermost windows take the outermost
    window (which covers them)."""
    k = len(classes)
    if maps.ndim != 3 or maps.shape[0] < k:
        raise ConfigError(f"similarity maps of shape {maps.shape} do not hold {k} classes")
    sx, sy = spec.scale.downsample_x, spec.scale.downsample_y
    d = float(downsample) if downsample is not None else geometry.stride * sx
    if not (math.isfinite(d) and d > 0):
        raise ConfigError(f"heat-map downsample must be > 0, got {downsample}")
    width_l0, height_l0 = image_size_l0
    w, h = max(1, math.ceil(width_l0 / d)), max(1, math.ceil(height_l0 / d))
    if w * h > MAX_HEATMAP_PIXELS:
        raise ConfigError(
            f"a heat map of {w}x{h} px is too large; use a coarser downsample (now {d:g})"
        )
    hp, wp = maps.shape[1:]
    kh, kw = geometry.kernel_hw
    s = geometry.stride
    # nearest window centre, ties to the window on the right/below (with the default downsample
    # and an even kernel the window centres fall on pixel edges: each window gets one pixel,
    # the one left of/above its centre)
    x_a = (np.arange(w) + 0.5) * d / sx
    y_a = (np.arange(h) + 0.5) * d / sy
    jj = np.clip(np.floor(x_a / s - kw / 2 + 0.5), 0, wp - 1).astype(np.intp)
    ii = np.clip(np.floor(y_a / s - kh / 2 + 0.5), 0, hp - 1).astype(np.intp)
    values = np.asarray(maps[:k], dtype=np.float32)[:, ii[:, None], jj[None, :]]
    return HeatMap(tuple(classes), values, d, (int(width_l0), int(height_l0)), mpp)


def heatmap_png(values: NDArray[np.float32]) -> bytes:
    """One (H, W) heat map as PNG bytes, 8-bit grey + alpha (module docstring)."""
    from PIL import Image

    if values.ndim != 2:
        raise ConfigError(f"a heat map is (H, W), got shape {values.shape}")
    finite = np.isfinite(values)
    grey = np.rint(255 * np.clip(np.where(finite, values, 0), 0, 1)).astype(np.uint8)
    alpha = np.where(finite, 255, 0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([grey, alpha], axis=-1), mode="LA").save(buf, format="PNG")
    return buf.getvalue()
