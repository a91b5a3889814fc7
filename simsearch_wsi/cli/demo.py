"""``demo``: the whole method on the embedded demo data, reporting what it produced."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from simsearch_wsi.cli.console import progress, rich_console
from simsearch_wsi.cli.engine import build_search
from simsearch_wsi.cli.exitcodes import EXIT_OK
from simsearch_wsi.cli.inputs import guard
from simsearch_wsi.cli.options import SEED
from simsearch_wsi.core.pathguard import naming_output

if TYPE_CHECKING:
    from simsearch_wsi.cli.options import Subparsers


def register(sub: Subparsers, engine: argparse.ArgumentParser) -> None:
    """Add ``demo`` to the commands."""
    p_demo = sub.add_parser(
        "demo",
        parents=[engine],
        help="run the whole method on embedded data and report what it produced",
        description="Generate the embedded demo data (synthetic H&E-like slides with ground "
        "truth, scikit-image's IHC sample as a pyramidal TIFF, a fluorescence slide and an "
        "OME-Zarr plate), then play the user with the prototypes in examples/: suggest -> "
        "simulated review -> background -> train -> predict, writing QuPath GeoJSON, OME-Zarr "
        "labels, quantification CSV and overlay PNGs, and scoring the result.",
    )
    p_demo.add_argument("--out", default="demo_output", help="output folder (default: %(default)s)")
    SEED.add(p_demo, help="training seed (default: 0)")
    p_demo.add_argument(
        "--examples",
        default=None,
        metavar="DIR",
        help="folder with the prototypes' GeoJSON files (default: the repository's examples/)",
    )
    p_demo.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from simsearch_wsi.demo import EXAMPLES_DIR, HE_PROTOTYPES, IHC_PROTOTYPES, run_demo

    console = rich_console()
    examples = Path(args.examples) if args.examples else EXAMPLES_DIR
    # the inputs are the prototype files (an output folder beside them inside the examples
    # folder overwrites nothing; a missing file is the demo's own one-line error)
    guard(
        args,
        inputs=[("prototypes", examples / name) for name in (HE_PROTOTYPES, IHC_PROTOTYPES)],
        into=[("--out", args.out)],
    )
    if args.cache is None:  # keep the demo self-contained
        args.cache = str(Path(args.out) / "feature_cache")
    search = build_search(args)
    with progress() as bars, naming_output("--out", args.out):
        result = run_demo(
            Path(args.out),
            seed=args.seed,
            search=search,
            examples_dir=examples,
            device=search.extractor.device,
            progress=bars,
        )
    console.print(result.summary(), markup=False)
    return EXIT_OK
