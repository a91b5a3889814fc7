"""The ``simsearch-wsi`` command line.

Errors the user can fix end in one line on stderr and a non-zero exit code; ``--debug`` shows
the traceback instead. The CLI is where devices, seeds and output are decided; the library
below it takes them as arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from simsearch_wsi import __version__
from simsearch_wsi.errors import SimSearchError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


# --- info ---------------------------------------------------------------------------------------
def _cmd_info(args: argparse.Namespace) -> int:
    from simsearch_wsi.io import is_plate, open_image, open_plate

    path = Path(args.image)
    if is_plate(path):
        plate = open_plate(path)
        info: dict[str, Any] = plate.describe()
        first = next(plate.fields(), None)
        if first is not None:
            with first.open(mpp=args.mpp) as img:
                info["first_field"] = {
                    "well": first.well,
                    "field": first.field_index,
                    **img.describe(),
                }
    else:
        with open_image(path, mpp=args.mpp) as img:
            info = img.describe()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return EXIT_OK


def _print_info(info: dict[str, Any]) -> None:
    from rich.table import Table

    console = _console()
    if "wells" in info:
        console.print(f"[bold]{info['path']}[/bold]  {info['format']}  plate {info['name']!r}")
        console.print(
            f"  rows {' '.join(info['rows'])} | columns {' '.join(info['columns'])} | "
            f"{info['n_wells']} wells, {info['n_fields']} fields"
        )
        for w in info["wells"]:
            console.print(f"  well {w['well']:<5} {w['path']:<8} fields {w['fields']}")
        if "first_field" in info:
            console.print("  first field:")
            _print_image(console, info["first_field"], indent="    ")
        return
    console.print(f"[bold]{info['path']}[/bold]")
    _print_image(console, info, indent="  ")
    table = Table(title=None, show_edge=False, pad_edge=False)
    for col in ("level", "width", "height", "downsample"):
        table.add_column(col, justify="right")
    for i, lv in enumerate(info["levels"]):
        table.add_row(str(i), str(lv["width"]), str(lv["height"]), f"{lv['downsample']:.4g}")
    console.print(table)


def _print_image(console: Any, info: dict[str, Any], indent: str) -> None:
    mpp = info["mpp"]
    mpp_text = (
        f"{mpp:.4g} um/px ({info['mpp_source']})" if mpp is not None else ("unknown (pass --mpp)")
    )
    w, h = info["dimensions"]
    rows = [
        ("format", info["format"]),
        ("size", f"{w} x {h} px at level 0, {info['level_count']} level(s)"),
        ("pixel size", mpp_text),
        ("channels", f"{info['n_channels']}: {', '.join(info['channels'])}"),
        ("dtype", f"{info['dtype']} ({info['bit_depth']}-bit)"),
        ("modality", info["modality"]),
    ]
    for key, value in (info.get("extra") or {}).items():
        rows.append((key.replace("_", " "), str(value)))
    for key, value in rows:
        console.print(f"{indent}{key:<16} {value}", markup=False)


# --- demo ---------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    from simsearch_wsi.demo import run_demo

    console = _console()
    with _progress() as progress:
        result = run_demo(Path(args.out), seed=args.seed, progress=progress)
    console.print(result.summary(), markup=False)
    return EXIT_OK


class _RichProgress:
    """Adapter from the library's ``progress(stage, done, total)`` callback to a rich bar."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=_console(stderr=True),
            transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)

    def __enter__(self) -> _RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


def _progress() -> _RichProgress:
    return _RichProgress()


# --- parser -------------------------------------------------------------------------------------
def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simsearch-wsi",
        description="Similarity search, training and quantification for whole-slide images "
        "and OME-Zarr plates, bridged to QuPath.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_info = sub.add_parser(
        "info",
        help="show what the readers know about an image or plate",
        description="Print levels, pixel size, channels, dtype and modality of a slide, "
        "OME-Zarr image or image file; for an OME-Zarr HCS plate, its wells and fields.",
    )
    p_info.add_argument("image", help="slide/image file, OME-Zarr image or plate folder")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of text")
    p_info.add_argument(
        "--mpp",
        type=_positive_float,
        default=None,
        help="level-0 pixel size in um/px when the file has none",
    )
    p_info.set_defaults(func=_cmd_info)

    p_demo = sub.add_parser(
        "demo",
        help="run the pipeline on embedded data and report what it produced",
        description="Generate the embedded demo data (a synthetic H&E-like slide, scikit-image's "
        "IHC sample as a pyramidal TIFF, a fluorescence slide and an OME-Zarr plate) and run "
        "every pipeline step that exists on it.",
    )
    p_demo.add_argument("--out", default="demo_output", help="output folder (default: %(default)s)")
    p_demo.add_argument("--seed", type=int, default=0, help="seed for the synthetic data")
    p_demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
