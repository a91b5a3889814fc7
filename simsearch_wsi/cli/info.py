"""``info``: what the readers know about an image or plate, as text or JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simsearch_wsi.cli.console import rich_console
from simsearch_wsi.cli.exitcodes import EXIT_OK
from simsearch_wsi.cli.options import MPP

if TYPE_CHECKING:
    from rich.console import Console

    from simsearch_wsi.cli.options import Subparsers


def register(sub: Subparsers, engine: argparse.ArgumentParser) -> None:
    """Add ``info`` to the commands (it takes no engine options)."""
    p_info = sub.add_parser(
        "info",
        help="show what the readers know about an image or plate",
        description="Print levels, pixel size, channels, dtype and modality of a slide, "
        "OME-Zarr image or image file; for an OME-Zarr HCS plate, its wells and fields.",
    )
    p_info.add_argument("image", help="slide/image file, OME-Zarr image or plate folder")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of text")
    MPP.add(p_info)
    p_info.set_defaults(func=_cmd_info)


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

    console = rich_console()
    if "wells" in info:
        console.print(f"[bold]{info['path']}[/bold]  {info['format']}  plate {info['name']!r}")
        console.print(
            f"  rows {' '.join(info['rows'])} | columns {' '.join(info['columns'])} | "
            f"{info['n_wells']} wells, {info['n_fields']} fields"
        )
        for w in info["wells"]:
            paths = w.get("field_paths") or []
            where = f"  {paths[0]}" + (" ..." if len(paths) > 1 else "") if paths else ""
            console.print(
                f"  well {w['well']:<5} {w['path']:<8} fields {w['fields']}{where}", markup=False
            )
        if info["wells"] and info["wells"][0].get("field_paths"):
            w0 = info["wells"][0]
            console.print(
                f"  one field is one image: give its path ({w0['field_paths'][0]}: row/column/"
                f"field), or the plate with --wells {w0['well']} --fields {w0['fields'][0]}",
                markup=False,
            )
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


def _print_image(console: Console, info: dict[str, Any], indent: str) -> None:
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
