"""``embed`` and ``suggest``: fill the feature cache ahead of time, and find patches similar to
prototype rectangles, written as QuPath detections (to a file, a project, a review session)."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from simsearch_wsi.cli.argtypes import int_at_least
from simsearch_wsi.cli.console import progress, rich_console
from simsearch_wsi.cli.engine import build_search, patch_size_l0
from simsearch_wsi.cli.exitcodes import EXIT_OK
from simsearch_wsi.cli.inputs import (
    guard,
    images_of,
    one_image,
    project_objects,
    report_skipped,
    session_file,
)
from simsearch_wsi.cli.options import (
    FLOOR,
    HEATMAP,
    HEATMAP_DOWNSAMPLE,
    THRESHOLD,
    add_patch_size,
    add_plate_selection,
    parse_thresholds,
)
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.pathguard import naming_output

if TYPE_CHECKING:
    from simsearch_wsi.cli.options import Subparsers
    from simsearch_wsi.search.heatmap import HeatMap


def register(sub: Subparsers, engine: argparse.ArgumentParser) -> None:
    """Add ``embed`` and ``suggest`` to the commands."""
    p_embed = sub.add_parser(
        "embed",
        parents=[engine],
        help="compute and cache dense features of images",
        description="Fill the feature cache for each image (foreground tiles only) so that later "
        "suggest calls with the same patch size answer without re-embedding.",
    )
    p_embed.add_argument(
        "images", nargs="+", metavar="IMAGE", help="images, OME-Zarr images, plates or plate fields"
    )
    add_patch_size(p_embed, "expected prototype size")
    add_plate_selection(p_embed)
    p_embed.set_defaults(func=_cmd_embed)

    p_sug = sub.add_parser(
        "suggest",
        parents=[engine],
        help="find patches similar to prototype rectangles",
        description="Read QuPath annotations (classified rectangles are prototypes), find "
        "similar patches on the image and write them as QuPath detections with 'similarity' and "
        "'rank' measurements.",
    )
    p_sug.add_argument(
        "image",
        metavar="IMAGE",
        help="an image, or one plate field: PLATE/A/1/0 (row/column/field) or PLATE with "
        "--wells A1 --fields 0",
    )
    add_plate_selection(p_sug)
    p_sug.add_argument(
        "--annotations",
        default=None,
        metavar="IN.geojson",
        help="QuPath GeoJSON export with the prototype rectangles",
    )
    p_sug.add_argument(
        "--out",
        default=None,
        metavar="OUT.geojson",
        help="where to write the suggestions (QuPath detections)",
    )
    THRESHOLD.add(
        p_sug,
        default=[],
        metavar="CLASS=VALUE",
        help="minimum similarity per class (repeatable; default 0.5)",
    )
    p_sug.add_argument(
        "--background",
        type=int_at_least(0),
        default=0,
        metavar="N",
        help="also propose N most and N least similar unlabelled patches as "
        "'background' candidates",
    )
    FLOOR.add(
        p_sug,
        help="also write the candidates down to this similarity (below the thresholds), ranked "
        "with the others, so a viewer (the QuPath panel) can move each class's threshold "
        "without searching again; review then approves by the thresholds it is given",
    )
    HEATMAP.add(
        p_sug,
        help="also write each class's similarity heat map: one PNG per class (PATH.png with one "
        "class, PATH_<class>.png with several), grey = 255 x similarity (clipped to 0..1), "
        "transparent where not embedded; pixel (u, v) covers level-0 pixels from origin + "
        "(u, v) x D, origin and D printed and in the --json summary",
    )
    HEATMAP_DOWNSAMPLE.add(p_sug)
    p_sug.add_argument("--json", action="store_true", help="print a JSON summary")
    p_sug.add_argument(
        "--qpproj",
        default=None,
        metavar="PROJECT",
        help="QuPath project: read the prototypes of IMAGE from it (unless --annotations) and "
        "write the suggestions into it (needs paquo and QuPath: extra 'qupath')",
    )
    p_sug.add_argument(
        "--session",
        default=None,
        metavar="DIR",
        help="review session folder (created if missing): prototypes and thresholds are saved "
        "there and used for later images; without --annotations the saved prototypes are used",
    )
    p_sug.add_argument(
        "--dense-fine",
        action="store_true",
        help="the object rule (--dense) at a finer analysis scale (objects at about 128 "
        "analysis px, up to 8x upsampled): for overlapping objects; about 4x the embedding time",
    )
    p_sug.set_defaults(func=_cmd_suggest)


def _cmd_embed(args: argparse.Namespace) -> int:
    from simsearch_wsi.io import open_image

    args.images = [i.path for i in images_of(args, args.images)]
    guard(args, inputs=[("image", p) for p in args.images])
    search = build_search(args)
    console = rich_console()
    with progress() as bars:
        for path in args.images:
            with open_image(path, mpp=args.mpp) as img:
                patch_l0 = patch_size_l0(args, img)
                spec, fmap = search.embed(img, patch_l0, progress=bars)
                window_l0 = search.window_size_l0(patch_l0)
                search.pool(spec, fmap, patch_size_l0=window_l0, progress=bars)
                h, w, d = fmap.shape
                console.print(
                    f"{path}: {w}x{h} cells x {d} features at level {spec.scale.level} "
                    f"(resample {spec.scale.resample:.3g}), {int(fmap.computed.sum())}/"
                    f"{fmap.computed.size} tiles embedded -> {fmap.path}",
                    markup=False,
                )
    return EXIT_OK


def _cmd_suggest(args: argparse.Namespace) -> int:
    from simsearch_wsi.io import open_image
    from simsearch_wsi.qupath.geojson import read_annotations, write_feature_collection
    from simsearch_wsi.review.session import Session, suggest_with_session

    if args.dense_fine and args.dense is False:
        raise ConfigError("--dense-fine is the object rule at a finer scale; leave out --no-dense")
    thresholds = parse_thresholds(args.threshold)
    chosen = one_image(args, args.image, "suggest")
    args.image = chosen.path
    if args.annotations is None and args.session is None and args.qpproj is None:
        raise ConfigError(
            "suggest needs --annotations IN.geojson (prototypes), --qpproj PROJECT, or "
            "--session DIR with saved prototypes"
        )
    if args.out is None and args.qpproj is None:
        raise ConfigError("suggest needs --out OUT.geojson (or --qpproj PROJECT to write into)")
    heatmap_files: dict[str, str] = {}
    guard(
        args,
        outputs=[("--out", args.out), ("--heatmap", args.heatmap)],
        inputs=[("image", args.image), ("annotations", args.annotations)],
        updated=session_file(args.session),
    )
    skipped: list[str] = []
    annotations = read_annotations(args.annotations, skipped=skipped) if args.annotations else None
    if args.qpproj is not None and annotations is None:
        annotations = list(project_objects(args.qpproj, args.image))
    with naming_output("--session", args.session):
        session = Session.open_or_new(args.session) if args.session else None
    search = build_search(args)
    if args.dense_fine:
        search = search.with_settings(dense=True, dense_fine=True)
    with (
        open_image(args.image, mpp=args.mpp) as img,
        progress() as bars,
        naming_output("--session", args.session),
    ):
        result = suggest_with_session(
            search,
            img,
            session=session,
            annotations=annotations,
            where=str(args.annotations),
            thresholds=thresholds,
            n_background=args.background,
            progress=bars,
            floor=args.floor,
            heatmap=args.heatmap is not None,
            heatmap_downsample=args.heatmap_downsample,
            dense=True if args.dense_fine else args.dense,
            candidates=args.candidates,
        )
    targets: dict[str, Path] = {}
    if args.heatmap is not None and result.heatmap is not None:
        # the per-class names are known now: check them before anything is written
        targets = heatmap_targets(args.heatmap, result.heatmap.classes)
        guard(
            args,
            outputs=[("--out", args.out), *(("--heatmap", str(t)) for t in targets.values())],
            inputs=[("image", args.image), ("annotations", args.annotations)],
            updated=session_file(args.session),
        )
    if targets and result.heatmap is not None:
        heatmap_files = _write_heatmaps(targets, result.heatmap)
    if args.out is not None:
        with naming_output("--out", args.out):
            write_feature_collection(args.out, result.geojson_features())
    if args.qpproj is not None:
        from simsearch_wsi.qupath.geojson import BACKGROUND_CLASS
        from simsearch_wsi.qupath.project import write_objects

        write_objects(
            args.qpproj,
            args.image,
            features=result.geojson_features(),
            replace_classes={*result.classes, BACKGROUND_CLASS},
        )
    summary = {**result.summary(), **chosen.extra}  # a plate field: plate, well, ... (issue 30)
    if result.heatmap is not None:
        summary["heatmap"] = {**result.heatmap.metadata(), "files": heatmap_files}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        console = rich_console()
        counts = ", ".join(f"{c}: {n}" for c, n in summary["suggestions_per_class"].items())
        console.print(
            f"{args.out or args.qpproj}: {counts}"
            + (f", background: {len(result.background)}" if args.background else ""),
            markup=False,
        )
        thr = ", ".join(f"{c}={v:.2f}" for c, v in result.thresholds.items())
        console.print(
            f"  thresholds {thr}; weights: {result.weights}; embed "
            f"{result.seconds_embed:.1f} s, query {result.seconds_query:.2f} s",
            markup=False,
        )
        if result.heatmap is not None:
            console.print(
                f"  heat maps ({result.heatmap.downsample:g} level-0 px per pixel, origin "
                f"{result.heatmap.origin_l0[0]:g},{result.heatmap.origin_l0[1]:g}): "
                + ", ".join(heatmap_files.values()),
                markup=False,
            )
        for note in result.notes:
            console.print(f"  note: {note}", markup=False)
    report_skipped(skipped)
    return EXIT_OK


def heatmap_targets(path: str, classes: Sequence[str]) -> dict[str, Path]:
    """The heat-map file of each class: ``path`` itself for one class, ``<stem>_<class><suffix>``
    for several (characters unsafe in file names replaced by ``_``); two classes that would
    share a file are refused."""
    out = Path(path)
    targets: dict[str, Path] = {}
    for name in classes:
        if len(classes) == 1:
            targets[name] = out
            continue
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        target = out.with_name(f"{out.stem}_{safe}{out.suffix or '.png'}")
        clash = [c for c, t in targets.items() if t == target]
        if clash:
            raise ConfigError(
                f"--heatmap {path}: classes {clash[0]!r} and {name!r} would both be written to "
                f"{target}; rename one of the classes"
            )
        targets[name] = target
    return targets


def _write_heatmaps(targets: dict[str, Path], heatmap: HeatMap) -> dict[str, str]:
    """One PNG per class, to the files :func:`heatmap_targets` named."""
    from simsearch_wsi.core.atomic import atomic_path
    from simsearch_wsi.search.heatmap import heatmap_png

    files: dict[str, str] = {}
    for name, target in targets.items():
        with naming_output("--heatmap", target), atomic_path(target) as tmp:
            Path(tmp).write_bytes(heatmap_png(heatmap.of(name)))
        files[name] = str(target)
    return files
