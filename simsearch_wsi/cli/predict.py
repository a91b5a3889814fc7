"""``predict``: apply a trained model bundle densely to images and plates: QuPath detections and
segmentation, OME-Zarr probabilities and labels, overlays and a quantification table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from simsearch_wsi.cli.argtypes import non_negative_float, positive_float
from simsearch_wsi.cli.console import progress, rich_console
from simsearch_wsi.cli.exitcodes import EXIT_OK
from simsearch_wsi.cli.inputs import guard
from simsearch_wsi.cli.options import (
    ALL_TILES,
    BATCH_SIZE,
    CACHE,
    DEVICE,
    FORCE,
    MPP,
    NO_AUTOCAST,
    THRESHOLD,
    TILE_SIZE,
    add_plate_selection,
    parse_device,
    parse_thresholds,
)
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.pathguard import naming_output

if TYPE_CHECKING:
    from simsearch_wsi.cli.options import Subparsers


def register(sub: Subparsers, engine: argparse.ArgumentParser) -> None:
    """Add ``predict`` to the commands (the model bundle fixes trunk, weights and channels, so
    only some engine options apply)."""
    p_pred = sub.add_parser(
        "predict",
        help="apply a trained model: detections, segmentation, OME-Zarr labels, quantification",
        description="Run a model bundle densely over each image (OME-Zarr plates: every field) "
        "and write per image QuPath GeoJSON (detections and segmentation annotations), an "
        "OME-Zarr with class probabilities and labels, an overlay PNG and a run record, and "
        "quantification.csv for all images. Images already done with the same model and "
        "settings are skipped (--force redoes them).",
    )
    p_pred.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="slides, images, OME-Zarr images, plates (every field, or --wells/--fields) or "
        "plate fields (PLATE/A/1/0)",
    )
    CACHE.add(
        p_pred,
        metavar="DIR",
        help="feature cache for models with search heads (--head-input search, tuned-search, "
        "ensemble, and auto's ensemble: search and ensemble models read the search's features, "
        "pass the search's --cache to reuse them; default: a temporary folder per image)",
    )
    p_pred.add_argument("--model", required=True, metavar="MODEL.zip", help="a trained bundle")
    p_pred.add_argument("--out", required=True, metavar="DIR", help="output folder")
    THRESHOLD.add(p_pred, help="confidence threshold of a class (default: the model's), repeatable")
    DEVICE.add(p_pred)
    NO_AUTOCAST.add(p_pred, help="run the trunk in float32")
    TILE_SIZE.add(p_pred, help="tile side in analysis pixels (default: %(default)s)")
    BATCH_SIZE.add(p_pred)
    p_pred.add_argument(
        "--simplify-px",
        type=non_negative_float,
        default=1.0,
        help="polygon simplification tolerance in mask pixels (default: %(default)s)",
    )
    p_pred.add_argument(
        "--min-area-um2",
        type=non_negative_float,
        default=0.0,
        help="drop segmentation pieces (and fill holes) under this area (default: %(default)s)",
    )
    p_pred.add_argument(
        "--object-size-px",
        type=positive_float,
        default=None,
        metavar="PX",
        help="objects of this size (level-0 px) smaller than the model's patch, which may touch "
        "(nuclei, blood cells): detections half an object apart with boxes of the object's "
        "size, instead of a patch apart with boxes of the patch",
    )
    p_pred.add_argument("--no-zarr", action="store_true", help="do not write <stem>.ome.zarr")
    p_pred.add_argument(
        "--write-back",
        action="store_true",
        help="also add the label mask to OME-Zarr inputs as labels/simsearch",
    )
    p_pred.add_argument(
        "--qpproj",
        metavar="PROJECT",
        default=None,
        help="also write the objects into this QuPath project (needs paquo and QuPath)",
    )
    FORCE.add(p_pred)
    MPP.add(p_pred, help="level-0 um/px when the file has none")
    ALL_TILES.add(p_pred)
    add_plate_selection(p_pred)
    p_pred.add_argument("--json", action="store_true", help="print the results as JSON")
    p_pred.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from simsearch_wsi.infer.dense import PatchModel
    from simsearch_wsi.infer.predict import (
        PredictSettings,
        check_thresholds,
        expand_inputs,
        predict_images,
        refuse_overwriting_inputs,
    )
    from simsearch_wsi.io import open_image
    from simsearch_wsi.io.selection import parse_fields, parse_wells
    from simsearch_wsi.train.bundle import load_bundle

    bundle = load_bundle(args.model)
    thresholds = parse_thresholds(args.threshold or [])
    check_thresholds(thresholds, bundle.classes)
    out = Path(args.out)
    targets = expand_inputs(
        list(args.images), wells=parse_wells(args.wells), fields=parse_fields(args.fields)
    )
    refuse_overwriting_inputs(targets, out, inputs=[("model", args.model)])
    guard(args, inputs=[("image", p) for p in args.images])  # --cache is written into
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; give an output folder")
    if args.qpproj is not None:
        from simsearch_wsi.qupath.project import read_project

        read_project(args.qpproj)  # fails early (and clearly) without paquo/QuPath
    model = PatchModel(
        bundle,
        device=parse_device(args.device),
        autocast=not args.no_autocast,
        cache_dir=args.cache,
    )
    settings = PredictSettings(
        thresholds=thresholds,
        simplify_px=args.simplify_px,
        min_area_um2=args.min_area_um2,
        tile_size=args.tile_size,
        batch_size=args.batch_size,
        write_zarr=not args.no_zarr,
        write_back=args.write_back,
        object_size_px=args.object_size_px,
        tiles="all" if args.all_tiles else "foreground",
    )
    with progress() as bars, naming_output("--out", out):
        results = predict_images(
            targets,
            model,
            out_dir=out,
            open_image=lambda p: open_image(p, mpp=args.mpp),
            settings=settings,
            resume=not args.force,
            progress=bars,
        )
    if args.qpproj is not None:
        from simsearch_wsi.qupath.geojson import BACKGROUND_CLASS
        from simsearch_wsi.qupath.project import write_objects

        for r in results:
            doc = json.loads(Path(r.outputs["geojson"]).read_text(encoding="utf-8"))
            write_objects(
                args.qpproj,
                r.image,
                features=doc["features"],
                replace_classes={*bundle.classes, BACKGROUND_CLASS},
            )
    table = out / "quantification.csv"
    if args.json:
        print(
            json.dumps(
                {"quantification": str(table), "images": [r.to_dict() for r in results]},
                indent=2,
            )
        )
        return EXIT_OK
    console = rich_console()
    for r in results:
        counts = ", ".join(f"{c} {n}" for c, n in r.n_detections.items())
        when = "unchanged, kept" if r.reused else f"{r.seconds:.1f} s"
        console.print(f"{r.image}: detections {counts} ({when})", markup=False)
        for kind, path in r.outputs.items():
            console.print(f"  {kind:<9} {path}", markup=False)
    console.print(f"{table}: one row per image and class", markup=False)
    return EXIT_OK
