"""The commands' inputs: the check, before any work, that no output replaces or lands inside an
input (inputs are sacred, :mod:`simsearch_wsi.core.pathguard`), the objects of an image in a
QuPath project, and the note on input objects that could not be read."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simsearch_wsi.cli.options import WEIGHTS_NAMES
from simsearch_wsi.core.pathguard import Named, check_outputs_not_inputs, check_writable


def _engine_paths(args: argparse.Namespace) -> tuple[list[Named], list[Named]]:
    """(inputs, folders written into) of the engine options: a ``--weights`` file is read, the
    ``--cache`` folder is written into."""
    weights = getattr(args, "weights", None)
    inputs: list[Named] = [("weights", weights)] if weights not in (None, *WEIGHTS_NAMES) else []
    cache = getattr(args, "cache", None)
    return inputs, [("--cache", cache)] if cache else []


def guard(
    args: argparse.Namespace,
    *,
    outputs: Sequence[Named] = (),
    inputs: Sequence[Named] = (),
    into: Sequence[Named] = (),
    updated: Sequence[Named] = (),
) -> None:
    """Refuse, before any work, an output that would replace or land inside an input, or that
    cannot be written."""
    engine_inputs, engine_into = _engine_paths(args)
    check_outputs_not_inputs(
        outputs, [*inputs, *engine_inputs], into=[*into, *engine_into], updated=updated
    )
    for label, path in outputs:
        check_writable(label, path)


def session_file(folder: str | None) -> list[Named]:
    """The session file of ``--session folder`` (none without one), for :func:`guard`."""
    from simsearch_wsi.review.session import SESSION_FILE

    return [("session file", Path(folder) / SESSION_FILE)] if folder else []


def project_objects(project: str, image: str) -> Any:
    """The objects of ``image`` in the QuPath project ``project``."""
    from simsearch_wsi.qupath.project import find_image, read_project

    return find_image(read_project(project), image).annotations


def report_skipped(skipped: list[str]) -> None:
    """Objects of the input that could not be read were left out; say so on stderr."""
    if skipped:
        print(
            f"simsearch-wsi: note: {len(skipped)} object(s) left out, e.g. {skipped[0]}",
            file=sys.stderr,
        )
