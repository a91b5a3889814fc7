"""The ``simsearch-wsi`` command line: the top-level parser and the one error handler.

Errors the user can fix end in one line on stderr and a non-zero exit code; ``--debug`` shows
the traceback instead. The CLI is where devices, seeds and output are decided; the library
below it takes them as arguments.

Each command sits with its options in its own module of this package (``info``, ``suggest``,
``review``, ``train``, ``pretrain``, ``predict``, ``quantify``, ``cohort``, ``serve``, ``evaluate``,
``demo``); options shared by several commands are declared once in :mod:`.options`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from simsearch_wsi import __version__
from simsearch_wsi.cli import (
    cohort,
    demo,
    evaluate,
    info,
    predict,
    pretrain,
    quantify,
    review,
    serve,
    suggest,
    train,
)
from simsearch_wsi.cli.exitcodes import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE
from simsearch_wsi.cli.options import engine_parser
from simsearch_wsi.core.errors import SimSearchError

if TYPE_CHECKING:
    from simsearch_wsi.cli.options import Subparsers

#: each adds its commands, in the order ``--help`` lists them
_COMMANDS: tuple[Callable[[Subparsers, argparse.ArgumentParser], None], ...] = (
    info.register,  # info
    suggest.register,  # embed, suggest
    review.register,  # review, background, session
    train.register,  # train
    pretrain.register,  # pretrain
    predict.register,  # predict
    quantify.register,  # quantify
    cohort.register,  # cohort
    serve.register,  # serve
    evaluate.register,  # evaluate
    demo.register,  # demo
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; a command's handler is its namespace's ``func``."""
    parser = argparse.ArgumentParser(
        prog="simsearch-wsi",
        description="Similarity search, training and quantification for whole-slide images "
        "and OME-Zarr plates, bridged to QuPath.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    engine = engine_parser()
    for register in _COMMANDS:
        register(sub, engine)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` (default: ``sys.argv[1:]``) and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return func(args)
    except SimSearchError as exc:
        if args.debug:
            raise
        print(f"simsearch-wsi: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, MemoryError) as exc:
        if args.debug:
            raise
        print(
            f"simsearch-wsi: error: {type(exc).__name__}: {exc} (rerun with --debug for details)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("simsearch-wsi: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
