"""Terminal output of the command line: the rich console commands print to, and the progress
bars that the library's ``progress(stage, done, total)`` callbacks drive."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


def rich_console(*, stderr: bool = False) -> Console:
    """A console for plain text: no highlighting, long lines wrapped by the terminal."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


class RichProgress:
    """Adapter from the library's ``progress(stage, done, total)`` callback to rich bars on
    stderr: one bar per stage, its text updated."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description:<44}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=rich_console(stderr=True),
            transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        # "supcon | epoch 3/16 loss 2.345": one bar per stage, its text updated
        key = stage.split(" | ", 1)[0]
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task(stage, total=total)
        self._progress.update(self._tasks[key], completed=done, total=total, description=stage)

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


def progress() -> RichProgress:
    """A fresh set of progress bars, to use as a context manager."""
    return RichProgress()
