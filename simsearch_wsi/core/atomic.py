"""Write outputs atomically: to a temporary name in the same folder, then rename.

A crash or an error never leaves a half-written file (or Zarr folder) under the final name.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (a file or a folder); rename it on success.

    An existing ``path`` is replaced only after the new content is complete. On an exception
    the temporary is removed and ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if final.is_dir() and tmp.is_dir():
            old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def remove_leftovers(path: str | os.PathLike[str]) -> list[Path]:
    """Remove what a killed :func:`atomic_path` writer of ``path`` left beside it (its
    temporary, or the previous folder it was replacing); ``path`` itself is not touched.

    Call it only while no other process writes ``path``. Returns what was removed.
    """
    final = Path(path)
    pattern = f".{glob.escape(final.name)}.{'[0-9a-f]' * 8}"
    removed = []
    for kind in (".tmp", ".old"):
        for p in final.parent.glob(pattern + kind):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")
