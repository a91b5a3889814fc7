"""Coordinate frames: level-0 boxes, level <-> level-0 locations, pixel-size checks.

Frames used across the project, and the suffix a name carries for each:

``_l0``
    level-0 pixels of an image (what QuPath and OpenSlide use), origin top-left, x right, y down.
``_lvl``
    pixels of one pyramid level ``k``; ``x_l0 = x_lvl * downsample_x[k]``.
``_a``
    pixels of the analysis grid (a level, resampled); conversions to and from level 0 are
    :meth:`simsearch_wsi.features.extractor.AnalysisScale.box_to_analysis` / ``box_to_l0``.
``_um``
    micrometres; ``x_um = x_l0 * mpp`` where ``mpp`` is level-0 micrometres per pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from simsearch_wsi.core.errors import ConfigError


@dataclass(frozen=True)
class BoxL0:
    """An axis-aligned box in level-0 pixels: top-left corner plus size."""

    x_l0: float
    y_l0: float
    width_l0: float
    height_l0: float

    @property
    def x1_l0(self) -> float:
        return self.x_l0 + self.width_l0

    @property
    def y1_l0(self) -> float:
        return self.y_l0 + self.height_l0

    @property
    def center_l0(self) -> tuple[float, float]:
        return (self.x_l0 + self.width_l0 / 2.0, self.y_l0 + self.height_l0 / 2.0)

    def intersects(self, other: BoxL0) -> bool:
        """True when the two boxes share a region of positive area."""
        return (
            self.x_l0 < other.x1_l0
            and other.x_l0 < self.x1_l0
            and self.y_l0 < other.y1_l0
            and other.y_l0 < self.y1_l0
        )

    def clipped(self, width_l0: float, height_l0: float) -> BoxL0:
        """The part of the box inside an image of ``width_l0`` x ``height_l0`` level-0 pixels
        (zero width or height when it lies outside)."""
        x0, y0 = min(max(self.x_l0, 0.0), width_l0), min(max(self.y_l0, 0.0), height_l0)
        x1, y1 = min(max(self.x1_l0, 0.0), width_l0), min(max(self.y1_l0, 0.0), height_l0)
        return BoxL0(x0, y0, x1 - x0, y1 - y0)

    def contains_point(self, x_l0: float, y_l0: float) -> bool:
        """True when the level-0 point lies inside the box (edges included)."""
        return self.x_l0 <= x_l0 <= self.x1_l0 and self.y_l0 <= y_l0 <= self.y1_l0


def lvl_to_l0_location(x_lvl: int, downsample: float) -> int:
    """Integer level-0 coordinate that :meth:`ImageSource.read_region` maps back to ``x_lvl``.

    ``read_region`` converts a level-0 location to level pixels with
    ``floor(x_l0 / downsample + 0.5)``. For a non-integer downsample (e.g. 4.016) the naive
    ``round(x_lvl * downsample)`` does not always survive that round trip, so this returns the
    integer nearest to ``x_lvl * downsample`` among those that do.

    Parameters
    ----------
    x_lvl
        a coordinate (x or y) in pixels of a level; may be negative (a halo outside the image).
    downsample
        that level's downsample along the same axis (level-0 pixels per level pixel), >= 1.

    Returns
    -------
    int
        ``x_l0`` with ``floor(x_l0 / downsample + 0.5) == x_lvl``.
    """
    if not math.isfinite(downsample) or downsample < 1.0 - 1e-9:
        raise ConfigError(
            f"downsample {downsample!r} is below 1; only levels at or coarser than level 0 can "
            "be addressed in level-0 pixels"
        )
    target = x_lvl * downsample
    centre = round(target)
    candidates = [
        c for c in range(centre - 2, centre + 3) if math.floor(c / downsample + 0.5) == x_lvl
    ]
    if not candidates:  # pragma: no cover - impossible for downsample >= 1
        raise ConfigError(f"no level-0 coordinate maps to level coordinate {x_lvl}")
    return min(candidates, key=lambda c: (abs(c - target), c))


# Plausible range for a microscope pixel size. TIFF files written by generic tools often carry
# 72 or 96 dpi display defaults (352.8 or 264.6 um/px) that are not a calibration.
MPP_PLAUSIBLE_RANGE_UM = (0.01, 100.0)


def validate_mpp(mpp: float, *, source: str) -> float:
    """Return ``mpp`` as a float, or raise :class:`ConfigError` naming ``source``."""
    value = float(mpp)
    lo, hi = MPP_PLAUSIBLE_RANGE_UM
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ConfigError(
            f"{source}: pixel size {mpp!r} um/px is outside the plausible range {lo}..{hi} um/px; "
            "pass the pixel size in micrometres per pixel (e.g. --mpp 0.5 for a 20x scan)"
        )
    return value
