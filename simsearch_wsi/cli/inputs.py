"""The commands' inputs: the images a command runs on (plates expanded to the fields that
``--wells`` and ``--fields`` select), the check, before any work, that no output replaces or
lands inside an input (inputs are sacred, :mod:`simsearch_wsi.core.pathguard`), the objects of
an image in a QuPath project, and the note on input objects that could not be read."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simsearch_wsi.cli.options import WEIGHTS_NAMES
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.pathguard import Named, check_outputs_not_inputs, check_writable

if TYPE_CHECKING:
    from simsearch_wsi.io.selection import ImageInput


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


def images_of(args: argparse.Namespace, paths: Sequence[str]) -> list[ImageInput]:
    """The images a command runs on: ``paths`` with plates expanded to their fields, as the
    command's ``--wells`` and ``--fields`` select
    (:func:`simsearch_wsi.io.selection.expand_images`)."""
    from simsearch_wsi.io.selection import expand_images, parse_fields, parse_wells

    return expand_images(
        list(paths),
        wells=parse_wells(getattr(args, "wells", None)),
        fields=parse_fields(getattr(args, "fields", None)),
    )


def one_image(args: argparse.Namespace, path: str, command: str) -> ImageInput:
    """The one image a single-image command (``suggest``, ``review``, ``background``) works on:
    an image, a plate field by path, or a plate whose ``--wells`` and ``--fields`` select one
    field."""
    found = images_of(args, [path])
    if len(found) != 1:
        first = found[0]
        raise ConfigError(
            f"{path}: {len(found)} plate fields selected; {command} works on one field: give it "
            f"as {first.path} (row/column/field), or select one with --wells "
            f"{first.extra['well']} --fields {first.extra['field']}"
        )
    return found[0]


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
