"""``quantify``: positive-cell IHC scoring as QuPath's positive cell detection reports it
(cells, positive %, 1+/2+/3+, H-score, cells/mm^2) per image and per QuPath annotation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simsearch_wsi.cli.argtypes import int_at_least, non_negative_float, positive_float
from simsearch_wsi.cli.console import progress, rich_console
from simsearch_wsi.cli.exitcodes import EXIT_OK
from simsearch_wsi.cli.inputs import guard, report_skipped
from simsearch_wsi.cli.options import MANIFEST, MPP
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.pathguard import naming_output

if TYPE_CHECKING:
    from simsearch_wsi.cli.options import Subparsers
    from simsearch_wsi.infer.cells import StainVectors


def register(sub: Subparsers, engine: argparse.ArgumentParser) -> None:
    """Add ``quantify`` to the commands (no trunk: it takes no engine options)."""
    p = sub.add_parser(
        "quantify",
        help="IHC positive cells: counts, positive %%, 1+/2+/3+, H-score, cells/mm^2",
        description="Detect cells on brightfield IHC (hematoxylin by colour deconvolution, "
        "nuclei by watershed, cells by expansion), classify them by nucleus DAB OD with "
        "QuPath's default thresholds, and score every QuPath annotation (or the tissue). "
        "Writes per image <stem>.ihc.geojson (QuPath cells + scored annotations) and "
        "<stem>.cells.csv, and ihc_scores.csv for all images (with the manifest's metadata; "
        "ihc_groups.png when a metadata column groups the images).",
    )
    p.add_argument("images", nargs="*", metavar="IMAGE", help="brightfield slides or images")
    MANIFEST.add(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--annotations",
        default=None,
        metavar="GEOJSON|DIR",
        help="QuPath GeoJSON of the regions to score (one image), or a folder of "
        "<stem>.geojson files (images without one are scored whole)",
    )
    p.add_argument(
        "--thresholds",
        type=float,
        nargs=3,
        default=(0.2, 0.4, 0.6),
        metavar=("T1", "T2", "T3"),
        help="1+/2+/3+ thresholds on the compartment (default: 0.2 0.4 0.6, QuPath's)",
    )
    p.add_argument(
        "--three-classes",
        action="store_true",
        help="classify cells 1+/2+/3+/Negative (default: Positive/Negative at T1)",
    )
    p.add_argument(
        "--compartment",
        default="Nucleus: DAB OD mean",
        help="measurement compared with the thresholds (default: %(default)s; e.g. "
        "'Cell: DAB OD mean', 'Cytoplasm: DAB OD mean', 'Nucleus: DAB OD max')",
    )
    p.add_argument(
        "--detection-image",
        choices=("hematoxylin", "od_sum"),
        default="hematoxylin",
        help="image nuclei are found on (default: %(default)s)",
    )
    p.add_argument(
        "--pixel-size-um",
        type=positive_float,
        default=0.5,
        help="work at this pixel size (um/px), within 10%%: a pyramid level averaged in "
        "integer blocks, e.g. 0.25 um/px slides in 2 x 2 (default: %(default)s, as QuPath)",
    )
    p.add_argument(
        "--nucleus-threshold",
        type=float,
        default=0.1,
        help="OD threshold of the nucleus detection (default: %(default)s)",
    )
    p.add_argument(
        "--cell-expansion-um",
        type=non_negative_float,
        default=5.0,
        help="cell = nucleus grown by this (default: %(default)s)",
    )
    p.add_argument(
        "--min-area-um2",
        type=non_negative_float,
        default=10.0,
        help="smallest nucleus kept (default: %(default)s)",
    )
    p.add_argument(
        "--max-area-um2",
        type=positive_float,
        default=400.0,
        help="largest nucleus kept (default: %(default)s)",
    )
    p.add_argument(
        "--stains",
        default="default",
        metavar="default|estimate|R,G,B;R,G,B",
        help="hematoxylin and DAB OD vectors: QuPath's H-DAB default, estimated per image, or "
        "given (default: %(default)s)",
    )
    p.add_argument(
        "--tissue",
        action="store_true",
        help="without annotations, score only the detected tissue (skips empty tiles of a "
        "slide; may miss pale stroma) instead of the whole image",
    )
    p.add_argument(
        "--tile-px",
        type=int_at_least(128, 8192),
        default=1024,
        help="tile side in working pixels, 128..8192 (default: %(default)s)",
    )
    p.add_argument(
        "--no-outlines",
        action="store_true",
        help="leave the cells out of <stem>.ihc.geojson (scored regions only; the cells stay in "
        "<stem>.cells.csv): faster and lighter on whole slides",
    )
    MPP.add(p, help="level-0 um/px when the file has none (needed for PNG/JPEG)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_cmd_quantify)


def parse_stains(text: str) -> StainVectors | str:
    """``default``, ``estimate``, or ``r,g,b;r,g,b`` (hematoxylin; DAB) as stain vectors."""
    from simsearch_wsi.infer.cells import QUPATH_H_DAB, StainVectors

    if text == "default":
        return QUPATH_H_DAB
    if text == "estimate":
        return "estimate"
    try:
        h, d = (tuple(float(v) for v in part.split(",")) for part in text.split(";"))
        if len(h) != 3 or len(d) != 3:
            raise ValueError
    except ValueError as exc:
        raise ConfigError(
            f"--stains {text!r}: use 'default', 'estimate' or 'r,g,b;r,g,b' (hematoxylin; DAB)"
        ) from exc
    return StainVectors(hematoxylin=(h[0], h[1], h[2]), dab=(d[0], d[1], d[2]))


def _cmd_quantify(args: argparse.Namespace) -> int:
    from simsearch_wsi.cohort.ihc import IHC_PLOT, IHC_RUN, IHC_TABLE, quantify_ihc_images
    from simsearch_wsi.infer.cells import CellDetectionParams
    from simsearch_wsi.infer.ihc import PositivityRule
    from simsearch_wsi.io import open_image
    from simsearch_wsi.io.selection import image_stem
    from simsearch_wsi.qupath.geojson import read_features

    entries: list[tuple[str, dict[str, str]]] = [(p, {}) for p in args.images]
    if args.manifest:
        from simsearch_wsi.cohort.run import read_manifest

        entries += [(e.path, e.metadata) for e in read_manifest(args.manifest)]
    if not entries:
        raise ConfigError("no images: give IMAGE paths or --manifest FILE.csv")
    for path, _ in entries:
        if not Path(path).exists():
            raise ConfigError(f"{path}: no such image; check the path")
    ann = Path(args.annotations) if args.annotations else None
    if ann is not None and not ann.exists():
        raise ConfigError(f"--annotations {ann}: not found; export the objects from QuPath")
    if ann is not None and ann.is_file() and len(entries) > 1:
        raise ConfigError(
            "--annotations FILE scores one image; for several give a folder of <stem>.geojson"
        )
    images = [(p, image_stem(p), m) for p, m in entries]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; give an output folder")
    outputs = [("--out", out / name) for name in (IHC_TABLE, IHC_PLOT, IHC_RUN)]
    for _, stem, _ in images:
        outputs += [("--out", out / f"{stem}.ihc.geojson"), ("--out", out / f"{stem}.cells.csv")]
    inputs = [("image", p) for p, _ in entries]
    if ann is not None:
        inputs.append(("--annotations", str(ann)))
    if args.manifest:
        inputs.append(("--manifest", args.manifest))
    guard(args, outputs=outputs, inputs=inputs)

    params = CellDetectionParams(
        pixel_size_um=args.pixel_size_um,
        detection_image=args.detection_image,
        threshold_od=args.nucleus_threshold,
        cell_expansion_um=args.cell_expansion_um,
        min_area_um2=args.min_area_um2,
        max_area_um2=args.max_area_um2,
    )
    rule = PositivityRule(
        compartment=args.compartment,
        thresholds=tuple(args.thresholds),
        single_threshold=not args.three_classes,
    )
    stains = parse_stains(args.stains)
    skipped: list[str] = []

    def annotation_file(path: str, stem: str) -> str | None:
        if ann is None:
            return None
        file = ann if ann.is_file() else ann / f"{stem}.geojson"
        return str(file) if file.is_file() else None

    def annotations_for(path: str, stem: str) -> Any:
        file = annotation_file(path, stem)
        return None if file is None else read_features(file, skipped=skipped)

    with progress() as bars, naming_output("--out", out):
        run = quantify_ihc_images(
            images,
            out_dir=out,
            open_image=lambda p: open_image(p, mpp=args.mpp),
            annotations=annotations_for,
            annotation_source=annotation_file,
            params=params,
            rule=rule,
            stains=stains,
            tissue=args.tissue,
            tile_px=args.tile_px,
            outlines=not args.no_outlines,
            progress=bars,
        )
    report_skipped(skipped)
    if args.json:
        doc = {
            "table": str(run.table),
            "plots": {k: str(v) for k, v in run.plots.items()},
            "images": [i.to_dict() for i in run.images],
        }
        print(json.dumps(doc, indent=2, allow_nan=False))
        return EXIT_OK
    console = rich_console()
    for img in run.images:
        console.print(f"{img.path}: {img.n_cells} cells ({img.seconds:.1f} s)", markup=False)
        for s in img.scores:
            pct = "-" if s.positive_pct is None else f"{s.positive_pct:.1f} %"
            h = "-" if s.h_score is None else f"{s.h_score:.0f}"
            dens = "" if s.cells_per_mm2 is None else f", {s.cells_per_mm2:.0f} cells/mm^2"
            console.print(
                f"  {s.region}: {s.n_cells} cells, positive {pct}, H-score {h}{dens}",
                markup=False,
            )
    console.print(f"{run.table}: one row per image and region", markup=False)
    return EXIT_OK
