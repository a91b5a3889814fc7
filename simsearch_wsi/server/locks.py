"""The server's locks: one for the engine (trunk and feature cache), one per session folder."""

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["Locks"]


class Locks:
    """The engine lock and one lock per session folder (always taken session first)."""

    def __init__(self) -> None:
        self.engine = threading.Lock()
        self._guard = threading.Lock()
        self._sessions: dict[Path, threading.Lock] = {}

    @contextlib.contextmanager
    def session(self, folder: Path | None) -> Iterator[None]:
        """Hold the lock of session ``folder`` (nothing when None)."""
        if folder is None:
            yield
            return
        with self._guard:
            lock = self._sessions.setdefault(folder, threading.Lock())
        with lock:
            yield
