"""Per-class similarity heat maps, aligned to the slide's level-0 pixels.

The search's similarity maps are (K, Hp, Wp) over pooled windows on the analysis grid (window
(i, j) centred at ``PatchGeometry.window_center_a(i, j)``, the windows ``P`` level-0 pixels
apart: the trunk's stride times the analysis downsample). A heat map gathers them on a level-0
grid of ``D = b * P`` level-0 pixels per heat-map pixel (``b`` >= 1 windows per side): heat-map
pixel (v, u) takes the **maximum** of windows ``[v*b, (v+1)*b) x [u*b, (u+1)*b)`` (NaN ignored;
so a hot spot survives any coarsening), and covers the level-0 square

    x_l0 in [x0 + u * D, x0 + (u + 1) * D)        y_l0 in [y0 + v * D, y0 + (v + 1) * D)

where ``(x0, y0) = origin_l0`` is half a pitch before the first window's centre. Every window's
centre lies in the pixel that holds its value; with ``b = 1`` a pixel's centre is its window's
centre exactly (``x_l0 = x0 + (u + 0.5) * D``). The pixels cover the windows' centres, so the
image (``width * D`` by ``height * D`` level-0 pixels from the origin) is about a window smaller
than the slide.

``b`` is the finest that keeps the longest side at most :data:`MAX_HEATMAP_SIDE_PX` pixels (a
display cap: a heat map never fails for its size) and, when a ``downsample`` is asked, at least
``downsample / P`` (rounded up). The heat maps are the raw class similarities (cosine,
[-1, 1]), before the competition between classes that suggestions go through; NaN where the
slide was not embedded (background tiles). With object candidates (``SearchSettings.candidates``
``"objects"``, or ``"auto"`` resolved to it) the windows carry the objects' own similarities, the
scale of their suggestions (:meth:`~simsearch_wsi.search.objects.ObjectCandidates.
similarity_maps`): a window inside an object's box has that object's, NaN outside every object.

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
from simsearch_wsi.search.choices import MAX_HEATMAP_SIDE_PX
from simsearch_wsi.search.similarity import PatchGeometry

__all__ = ["MAX_HEATMAP_SIDE_PX", "HeatMap", "heatmap_l0", "heatmap_png"]


@dataclass(frozen=True)
class HeatMap:
    """Similarity heat maps of one image on a level-0 aligned grid (module docstring).

    ``values``: (K, H, W) float32 cosine similarities, NaN where not embedded; ``downsample``:
    level-0 pixels per heat-map pixel along x (``downsample_y`` along y, the same unless the
    analysis scale differs between axes); ``origin_l0``: level-0 (x, y) of pixel (0, 0)'s
    top-left corner; ``image_size_l0``: (width, height) of the slide; ``mpp``: the slide's
    level-0 micrometres per pixel, when known."""

    classes: tuple[str, ...]
    values: NDArray[np.float32]
    downsample: float
    image_size_l0: tuple[int, int]
    mpp: float | None = None
    origin_l0: tuple[float, float] = (0.0, 0.0)
    downsample_y: float | None = None

    @property
    def pixel_size_l0(self) -> tuple[float, float]:
        """(x, y) level-0 pixels per heat-map pixel."""
        dy = self.downsample if self.downsample_y is None else self.downsample_y
        return (self.downsample, dy)

    def of(self, name: str) -> NDArray[np.float32]:
        """(H, W) heat map of class ``name``."""
        if name not in self.classes:
            raise ConfigError(f"no heat map for class {name!r}; classes: {list(self.classes)}")
        out: NDArray[np.float32] = self.values[self.classes.index(name)]
        return out

    def value_at_l0(self, name: str, x_l0: float, y_l0: float) -> float:
        """The class's heat-map value at a level-0 point (NaN outside the heat map)."""
        h, w = self.values.shape[1:]
        dx, dy = self.pixel_size_l0
        u = math.floor((x_l0 - self.origin_l0[0]) / dx)
        v = math.floor((y_l0 - self.origin_l0[1]) / dy)
        if not (0 <= u < w and 0 <= v < h):
            return math.nan
        return float(self.of(name)[v, u])

    def metadata(self) -> dict[str, Any]:
        """What a reader needs to place the images on the slide (JSON-ready): pixel (u, v)
        covers level-0 x from ``origin_l0[0] + u * downsample``, y from
        ``origin_l0[1] + v * downsample_y``."""
        h, w = self.values.shape[1:]
        dx, dy = self.pixel_size_l0
        return {
            "classes": list(self.classes),
            "downsample": dx,
            "downsample_y": dy,
            "width": int(w),
            "height": int(h),
            "image_size_l0": list(self.image_size_l0),
            "mpp": self.mpp,
            "pixel_size_um": None if self.mpp is None else self.mpp * dx,
            "encoding": "PNG, grey = round(255 * clip(similarity, 0, 1)), alpha 0 = not embedded; "
            "a pixel is the maximum of the windows it covers",
            "origin_l0": [float(self.origin_l0[0]), float(self.origin_l0[1])],
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
    max_side_px: int = MAX_HEATMAP_SIDE_PX,
) -> HeatMap:
    """The first ``len(classes)`` maps of ``maps`` (K [+1], Hp, Wp) on a level-0 aligned grid.

    ``downsample``: the coarsest level-0 pixels per heat-map pixel wanted (rounded up to whole
    windows; default: the windows' pitch, one window per pixel). The grid is coarsened further
    (block maximum) until its longest side is at most ``max_side_px``; see the module
    docstring for the alignment."""
    k = len(classes)
    if maps.ndim != 3 or maps.shape[0] < k:
        raise ConfigError(f"similarity maps of shape {maps.shape} do not hold {k} classes")
    if downsample is not None and not (math.isfinite(downsample) and downsample > 0):
        raise ConfigError(f"heat-map downsample must be > 0, got {downsample}")
    if max_side_px < 1:
        raise ConfigError(f"heat-map side cap must be >= 1 pixel, got {max_side_px}")
    s = geometry.stride
    pitch_x, pitch_y = s * spec.scale.downsample_x, s * spec.scale.downsample_y
    hp, wp = maps.shape[1:]
    b = max(1, math.ceil(max(hp, wp) / max_side_px))
    if downsample is not None:
        b = max(b, math.ceil(downsample / pitch_x - 1e-9))
    h, w = -(-hp // b), -(-wp // b)
    block = np.full((k, h * b, w * b), -np.inf, dtype=np.float32)
    sub = np.asarray(maps[:k], dtype=np.float32)
    block[:, :hp, :wp] = np.where(np.isfinite(sub), sub, -np.inf)
    values = block.reshape(k, h, b, w, b).max(axis=(2, 4))
    values[np.isneginf(values)] = np.nan
    kh, kw = geometry.kernel_hw
    # window (0, 0)'s level-0 centre, less half a pitch: the corner of the pixel it sits in
    origin = ((kw / 2 - 0.5) * pitch_x, (kh / 2 - 0.5) * pitch_y)
    return HeatMap(
        tuple(classes),
        values,
        b * pitch_x,
        (int(image_size_l0[0]), int(image_size_l0[1])),
        mpp,
        origin_l0=origin,
        downsample_y=b * pitch_y,
    )


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
