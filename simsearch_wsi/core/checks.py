"""Argument checks shared by writers and generators, with messages that name the argument."""

from __future__ import annotations

import numpy as np

from simsearch_wsi.core.errors import ConfigError

__all__ = ["check_positive_int"]


def check_positive_int(name: str, value: int, *, minimum: int = 1) -> int:
    """``value`` as an ``int`` when it is an integer (not a bool) >= ``minimum``.

    Raises
    ------
    ConfigError
        naming ``name``, otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
