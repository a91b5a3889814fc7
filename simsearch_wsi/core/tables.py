"""Reading user-supplied CSV tables (manifests, ground truth) with one-line errors."""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterator

from simsearch_wsi.core.errors import ConfigError

__all__ = ["csv_errors"]


@contextlib.contextmanager
def csv_errors(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Turn the errors of reading ``path`` as UTF-8 CSV into a :class:`ConfigError` naming it.

    A binary file, a file saved in another encoding (Latin-1, UTF-16) and a CSV the ``csv``
    module refuses (a field over its size limit, a NUL byte in a quoted field) raised a
    ``UnicodeDecodeError`` or ``csv.Error`` with a traceback; ``what`` names the table in the
    message (``"manifest"``, ``"ground-truth table"``).
    """
    try:
        yield
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: the {what} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it "
            "as CSV (UTF-8)"
        ) from exc
    except csv.Error as exc:
        raise ConfigError(f"{path}: the {what} is not a readable CSV file ({exc})") from exc
