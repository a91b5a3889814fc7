"""``review``, ``background`` and ``session show``: ingest the user's decisions on suggestions
into a review session, propose background patches to confirm, and show what a session holds."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from simsearch_wsi.cli.argtypes import int_at_least
from simsearch_wsi.cli.console import progress, rich_console
from simsearch_wsi.cli.engine import build_search
from simsearch_wsi.cli.exitcodes import EXIT_OK
from simsearch_wsi.cli.inputs import (
    guard,
    one_image,
    project_objects,
    report_skipped,
    session_file,
)
from simsearch_wsi.cli.options import THRESHOLD, add_plate_selection, parse_thresholds
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.pathguard import naming_output
from simsearch_wsi.qupath.geojson import REJECTED_CLASS

if TYPE_CHECKING:
    from simsearch_wsi.cli.options import Subparsers


def register(sub: Subparsers, engine: argparse.ArgumentParser) -> None:
    """Add ``review``, ``background`` and ``session`` to the commands."""
    p_rev = sub.add_parser(
        "review",
        help="ingest the user's decisions on suggestions (QuPath GeoJSON export)",
        description="Read the objects exported from QuPath after review: suggestions left in "
        f"place are approved (at or above the class threshold), suggestions given the class "
        f"'{REJECTED_CLASS}' are negatives of their class, relabelled ones become positives "
        "of the new class, deleted ones stay unreviewed; new classified rectangles become "
        "prototypes. Re-ingesting the same file changes nothing.",
    )
    p_rev.add_argument("image", metavar="IMAGE", help="an image or one plate field (as suggest)")
    add_plate_selection(p_rev)
    p_rev.add_argument("--annotations", default=None, metavar="REVIEWED.geojson")
    p_rev.add_argument(
        "--qpproj",
        default=None,
        metavar="PROJECT",
        help="read the decisions from a QuPath project instead (needs paquo and QuPath: "
        "extra 'qupath')",
    )
    p_rev.add_argument("--session", required=True, metavar="DIR")
    THRESHOLD.add(
        p_rev,
        default=[],
        metavar="CLASS=VALUE",
        help="the similarity threshold a class ended at (repeatable; saved in the session): "
        "suggestions kept in place are approved at or above it; classes left out keep theirs",
    )
    p_rev.add_argument("--json", action="store_true", help="print the report as JSON")
    p_rev.set_defaults(func=_cmd_review)

    p_bg = sub.add_parser(
        "background",
        parents=[engine],
        help="propose background patches for the user to confirm",
        description="Propose the N unlabelled patches most similar and the N least similar to "
        "the mean of the session's prototypes, as detections of class 'background'.",
    )
    p_bg.add_argument("image", metavar="IMAGE", help="an image or one plate field (as suggest)")
    add_plate_selection(p_bg)
    p_bg.add_argument("--session", required=True, metavar="DIR")
    p_bg.add_argument("--out", required=True, metavar="OUT.geojson")
    p_bg.add_argument(
        "--n", type=int_at_least(1), default=10, help="candidates of each kind (default 10)"
    )
    p_bg.set_defaults(func=_cmd_background)

    p_ses = sub.add_parser("session", help="inspect a review session")
    ses_sub = p_ses.add_subparsers(dest="session_command", metavar="ACTION")
    p_show = ses_sub.add_parser("show", help="classes, thresholds, counts, reviewed images")
    p_show.add_argument("dir", metavar="DIR")
    p_show.add_argument("--json", action="store_true")
    p_show.set_defaults(func=_cmd_session_show)


def _cmd_review(args: argparse.Namespace) -> int:
    from simsearch_wsi.io import open_image
    from simsearch_wsi.qupath.geojson import read_annotations
    from simsearch_wsi.review.session import Session

    if (args.annotations is None) == (args.qpproj is None):
        raise ConfigError(
            "review needs exactly one of --annotations REVIEWED.geojson or --qpproj PROJECT"
        )
    args.image = one_image(args, args.image, "review").path
    guard(
        args,
        inputs=[("image", args.image), ("annotations", args.annotations)],
        updated=session_file(args.session),
    )
    session = Session.open(args.session)
    skipped: list[str] = []
    annotations = (
        read_annotations(args.annotations, skipped=skipped)
        if args.annotations is not None
        else list(project_objects(args.qpproj, args.image))
    )
    with open_image(args.image) as img:  # checks the image exists and is readable
        report = session.ingest_review(
            img.path,
            annotations,
            source=str(args.annotations or args.qpproj),
            image_size_l0=img.dimensions,
            thresholds=parse_thresholds(args.threshold),
        )
    with naming_output("--session", args.session):
        session.save()
    report_skipped(skipped)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return EXIT_OK
    console = rich_console()
    console.print(
        f"{args.image}: approved {report.approved}, rejected {report.rejected}, relabelled "
        f"{report.relabelled}, background {report.background}, not background "
        f"{report.not_background}, new prototypes {report.new_prototypes}; below threshold "
        f"{report.below_threshold}, unreviewed {report.unreviewed}, unchanged {report.unchanged}",
        markup=False,
    )
    for conflict in report.conflicts:
        console.print(
            f"  conflict with an earlier review (the newer decision is kept): {conflict}",
            markup=False,
        )
    return EXIT_OK


def _cmd_background(args: argparse.Namespace) -> int:
    from simsearch_wsi.io import open_image
    from simsearch_wsi.qupath.geojson import write_feature_collection
    from simsearch_wsi.review.session import Session, background_with_session

    args.image = one_image(args, args.image, "background").path
    guard(
        args,
        outputs=[("--out", args.out)],
        inputs=[("image", args.image)],
        updated=session_file(args.session),
    )
    session = Session.open(args.session)
    search = build_search(args)
    with (
        open_image(args.image, mpp=args.mpp) as img,
        progress() as bars,
        naming_output("--session", args.session),
    ):
        result = background_with_session(
            search,
            img,
            session=session,
            n=args.n,
            progress=bars,
            dense=args.dense,
            candidates=args.candidates,
        )
    with naming_output("--out", args.out):
        write_feature_collection(args.out, result.geojson_features())
    rich_console().print(
        f"{args.out}: {len(result.background)} background candidates", markup=False
    )
    return EXIT_OK


def _cmd_session_show(args: argparse.Namespace) -> int:
    from simsearch_wsi.review.session import Session

    summary = Session.open(args.dir).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    console = rich_console()
    console.print(f"session {summary['session']} (version {summary['version']})", markup=False)
    patch = summary["patch_size_l0"]
    console.print(
        "  patch size " + (f"{patch[0]:.0f} x {patch[1]:.0f} px (level 0)" if patch else "unset"),
        markup=False,
    )
    for name, c in summary["classes"].items():
        console.print(
            f"  {name:<20} threshold {c['threshold']:.2f}  prototypes {c['prototypes']}  "
            f"positives {c['positives']}  negatives {c['negatives']}",
            markup=False,
        )
    console.print(
        f"  background {summary['background']} (rejected {summary['not_background']}); "
        f"suggestions sent {summary['suggestions_sent']}; reviewed images "
        f"{len(summary['reviewed_images'])}, unreviewed {len(summary['unreviewed_images'])}",
        markup=False,
    )
    return EXIT_OK
