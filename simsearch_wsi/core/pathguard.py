"""Inputs are sacred: no command writes over one of its own inputs, whatever the path spelling.

One check, :func:`check_outputs_not_inputs`, shared by every command of the CLI and every job of
the server. Paths are compared after resolving them (relative and absolute spellings, ``..``,
symlinks), and by file identity (``os.path.samefile``: hard links, case-insensitive file
systems) where both exist. Four kinds of paths take part:

``outputs``
    files or folders replaced as a whole (``--out OUT.geojson``, a model bundle, an output
    OME-Zarr store). One must not be an input, lie inside an input folder (an OME-Zarr image),
    or hold an input (a folder replaced as a whole would take the input with it).
``into``
    folders written into (``predict --out DIR``, a feature cache). One must not be an input
    file, be an input folder, or lie inside one; inputs inside it are fine (the names written
    there are checked as ``outputs``).
``updated``
    documents read and rewritten in place on purpose (a session's ``session.json``): inputs of
    the outputs and folders above, and outputs with respect to the other inputs.
``inputs``
    everything read: images, annotations, models, manifests, weights.

Writing labels into an OME-Zarr input (``predict --write-back``) is a feature, not an output in
this sense: it adds ``labels/`` and replaces no file of the input.

:func:`naming_output` turns an ``OSError`` raised while writing an output into a one-line
:class:`~simsearch_wsi.core.errors.OutputNotWritableError` that names the path the user
gave (not the hidden temporary the atomic writer used).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from simsearch_wsi.core.errors import (
    OutputNotWritableError,
    OutputOverwritesInputError,
    SimSearchError,
)

__all__ = ["Named", "check_outputs_not_inputs", "naming_output", "same_path"]

#: ``(label, path)``: how messages name the path (``"--out"``, ``"image"``) and the path.
Named = tuple[str, "str | os.PathLike[str] | None"]


class _Entry:
    """A path as the user spelled it and as it resolves."""

    def __init__(self, label: str, path: str | os.PathLike[str]) -> None:
        self.label = label
        self.raw = os.fspath(path)
        self.resolved = _resolve(self.raw)

    def shown(self) -> str:
        r = str(self.resolved)
        return self.raw if r == self.raw else f"{self.raw} (resolves to {r})"


def _resolve(raw: str) -> Path:
    try:
        return Path(raw).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, an invalid name
        return Path(os.path.abspath(raw))


def _entries(items: Iterable[Named]) -> list[_Entry]:
    return [_Entry(label, path) for label, path in items if path is not None and os.fspath(path)]


def _samefile(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def same_path(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when ``a`` and ``b`` name the same file or folder: equal once resolved, or the same
    file by identity where both exist (hard links, case-insensitive file systems)."""
    ra, rb = _resolve(os.fspath(a)), _resolve(os.fspath(b))
    return ra == rb or _samefile(ra, rb)


def _inside(child: Path, folder: Path) -> bool:
    """True when ``child`` lies strictly inside ``folder`` (after resolving both)."""
    if child != folder and child.is_relative_to(folder):
        return True
    if not folder.is_dir():
        return False
    # another spelling of the same folder (bind mount, case-insensitive file system)
    return any(_samefile(parent, folder) for parent in child.parents if parent.exists())


def _refuse(out: _Entry, inp: _Entry, relation: str, advice: str) -> OutputOverwritesInputError:
    return OutputOverwritesInputError(
        f"{out.label} {out.shown()} {relation} {inp.label} {inp.shown()}; {advice}"
    )


def check_outputs_not_inputs(
    outputs: Iterable[Named],
    inputs: Iterable[Named],
    *,
    into: Iterable[Named] = (),
    updated: Iterable[Named] = (),
) -> None:
    """Refuse, before anything is written, any output that would replace or land inside an input.

    Parameters
    ----------
    outputs
        ``(label, path)`` of files or folders replaced as a whole; ``None`` paths are skipped.
        The label is how the user gave it (``"--out"``, ``"model"``).
    inputs
        ``(role, path)`` of everything read; the role names it in messages (``"image"``,
        ``"annotations"``, ``"model"``).
    into
        ``(label, path)`` of folders written into.
    updated
        ``(role, path)`` of documents rewritten in place on purpose (a session file).

    Raises
    ------
    OutputOverwritesInputError
        (a :class:`~simsearch_wsi.core.errors.ConfigError`) naming the output, the input it would
        overwrite and what to do.
    """
    outs, ins, folders, docs = (
        _entries(outputs),
        _entries(inputs),
        _entries(into),
        _entries(updated),
    )
    for folder in folders:
        for inp in [*ins, *docs]:
            if folder.resolved == inp.resolved or _samefile(folder.resolved, inp.resolved):
                advice = (
                    "choose an output folder outside it"
                    if inp.resolved.is_dir()
                    else "give an output folder, not an input file"
                )
                raise _refuse(folder, inp, "is the input", advice)
            if _inside(folder.resolved, inp.resolved):
                raise _refuse(
                    folder, inp, "lies inside the input", "choose an output folder outside it"
                )
    for out in [*outs, *docs]:
        for inp in ins if any(out is d for d in docs) else [*ins, *docs]:
            if out.resolved == inp.resolved or _samefile(out.resolved, inp.resolved):
                raise _refuse(out, inp, "would replace an input, the", "choose another output path")
            if _inside(out.resolved, inp.resolved):
                raise _refuse(out, inp, "lies inside the input", "choose an output path outside it")
            if _inside(inp.resolved, out.resolved):
                raise _refuse(
                    out,
                    inp,
                    "would replace a folder holding the input",
                    "choose an output path that holds no input",
                )


def _concerns(filename: object, out: Path) -> bool:
    """Whether an OSError's ``filename`` is ``out``, inside it, a folder above it, or the
    hidden temporary sibling the atomic writer uses for it."""
    if not isinstance(filename, str | os.PathLike):
        return False
    name = _resolve(os.fspath(filename))
    if name == out or name.is_relative_to(out) or out.is_relative_to(name):
        return True
    return name.parent == out.parent and name.name.startswith(f".{out.name}.")


def check_writable(label: str, path: str | os.PathLike[str] | None) -> None:
    """Refuse, before any work, an output that cannot be created: the nearest existing folder
    on its way must be a folder this process may write into. Catches a missing permission or a
    parent that is a file up front, so a command does not first update a session and then fail
    on its output (:class:`~simsearch_wsi.core.errors.OutputNotWritableError`)."""
    if path is None or not os.fspath(path):
        return
    given = Path(os.fspath(path))
    target = Path(os.path.abspath(given))
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        reason = f"{ancestor} is not a folder"
    elif not os.access(ancestor, os.W_OK | os.X_OK):
        reason = f"no permission to write in {ancestor}"
    else:
        return
    raise OutputNotWritableError(
        f"{label} {os.fspath(given)}: cannot be written ({reason}); choose a path in a folder "
        "you can write to"
    )


@contextmanager
def naming_output(label: str, path: str | os.PathLike[str] | None) -> Iterator[None]:
    """Turn an ``OSError`` about writing ``path`` (or its temporary, or a folder above it) into
    :class:`~simsearch_wsi.core.errors.OutputNotWritableError` naming ``path`` as the user gave it.

    Other errors (reading an input, a library error) pass through unchanged; with ``path``
    None nothing is changed.
    """
    if path is None or not os.fspath(path):
        yield
        return
    out = _resolve(os.fspath(path))
    try:
        yield
    except SimSearchError:
        raise
    except OSError as exc:
        if not (_concerns(exc.filename, out) or _concerns(exc.filename2, out)):
            raise
        reason = exc.strerror or type(exc).__name__
        raise OutputNotWritableError(
            f"{label} {os.fspath(path)}: cannot be written ({reason}); choose a path in a "
            "folder you can write to",
        ) from exc
