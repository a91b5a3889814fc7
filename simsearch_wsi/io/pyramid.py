"""Image pyramids for the writers: level 0 plus successive 2x2 area averages (floor size)."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.checks import check_positive_int
from simsearch_wsi.core.errors import ConfigError

__all__ = ["area_pyramid", "check_n_levels", "halve"]


def check_n_levels(n_levels: int, *, width: int, height: int, what: str = "image") -> int:
    """``n_levels`` as an ``int`` when a ``width`` x ``height`` image has that many non-empty
    halvings; :class:`ConfigError` otherwise."""
    n = check_positive_int("n_levels", n_levels)
    if min(width, height) >> (n - 1) < 1:
        raise ConfigError(
            f"n_levels={n} is too many for a {width}x{height} {what}: the smallest level would "
            "be empty; use fewer levels"
        )
    return n


def halve(a: NDArray[Any], y_axis: int) -> NDArray[Any]:
    """2x2 area average over axes ``y_axis, y_axis + 1`` (floor size).

    Integers of up to 16 bits are averaged exactly and rounded half up; other types are averaged
    in float64 (integers rounded half to even) and cast back to ``a``'s dtype.
    """
    h, w = a.shape[y_axis] // 2, a.shape[y_axis + 1] // 2

    def part(dy: int, dx: int) -> NDArray[Any]:
        idx: list[slice] = [slice(None)] * a.ndim
        idx[y_axis] = slice(dy, 2 * h, 2)
        idx[y_axis + 1] = slice(dx, 2 * w, 2)
        return a[tuple(idx)]

    if np.issubdtype(a.dtype, np.integer) and a.dtype.itemsize <= 2:
        s: NDArray[np.uint32] = part(0, 0).astype(np.uint32)
        s += part(0, 1)
        s += part(1, 0)
        s += part(1, 1)
        s += 2
        s //= 4
        return s.astype(a.dtype)
    total: NDArray[np.float64] = part(0, 0).astype(np.float64)
    total += part(0, 1)
    total += part(1, 0)
    total += part(1, 1)
    total /= 4.0
    if np.issubdtype(a.dtype, np.integer):
        np.rint(total, out=total)
    return total.astype(a.dtype)


def area_pyramid(a: NDArray[Any], n_levels: int, *, y_axis: int) -> list[NDArray[Any]]:
    """Level 0 (``a`` itself) plus ``n_levels - 1`` successive 2x2 area averages
    (:func:`halve`) over axes ``y_axis, y_axis + 1``."""
    levels = [a]
    for _ in range(n_levels - 1):
        levels.append(halve(levels[-1], y_axis))
    return levels
