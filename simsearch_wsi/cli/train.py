"""``train``: a patch classifier from a review session, written as a model bundle."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from simsearch_wsi.cli.argtypes import non_negative_float
from simsearch_wsi.cli.console import progress, rich_console
from simsearch_wsi.cli.engine import build_search
from simsearch_wsi.cli.exitcodes import EXIT_OK
from simsearch_wsi.cli.inputs import guard, images_of, session_file
from simsearch_wsi.cli.options import PRESET, SEED, add_plate_selection
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.pathguard import naming_output
from simsearch_wsi.train.choices import (
    DEFAULT_HEAD_INPUT,
    DEFAULT_SIMILARITY_EXPERT,
    DEFAULT_STRATEGY,
    HEAD_INPUT_HELP,
    HEAD_INPUTS,
    SIMILARITY_EXPERT_HELP,
    STRATEGIES,
)

if TYPE_CHECKING:
    from simsearch_wsi.cli.options import Subparsers


def register(sub: Subparsers, engine: argparse.ArgumentParser) -> None:
    """Add ``train`` to the commands."""
    p_train = sub.add_parser(
        "train",
        parents=[engine],
        help="train a patch classifier from a review session",
        description="Train on the session's prototypes, approved and rejected suggestions and "
        "background, plus noisy patches mined from unreviewed images, and write a model bundle "
        "that `predict` applies to other slides.",
    )
    p_train.add_argument("--session", required=True, metavar="DIR")
    p_train.add_argument(
        "--strategy",
        default=DEFAULT_STRATEGY,
        choices=list(STRATEGIES),
        help="which data to train on (default: %(default)s)",
    )
    PRESET.add(
        p_train,
        help="fast: minutes on a laptop CPU; paper: the SimSearch paper's epochs and schedules "
        "(default: %(default)s)",
    )
    p_train.add_argument(
        "--head-input",
        default=DEFAULT_HEAD_INPUT,
        choices=list(HEAD_INPUTS),
        help=f"{HEAD_INPUT_HELP} (default: %(default)s)",
    )
    p_train.add_argument(
        "--similarity-expert",
        type=non_negative_float,
        default=DEFAULT_SIMILARITY_EXPERT,
        metavar="W",
        help=f"{SIMILARITY_EXPERT_HELP} (default: %(default)s)",
    )
    p_train.add_argument(
        "--out", default=None, metavar="MODEL.zip", help="bundle to write (default: DIR/model.zip)"
    )
    p_train.add_argument(
        "--noisy-images",
        nargs="+",
        default=None,
        metavar="IMAGE",
        help="unreviewed images to mine noisy patches from (default: the session's unreviewed "
        "images)",
    )
    add_plate_selection(p_train)
    SEED.add(p_train)
    p_train.add_argument("--json", action="store_true", help="print the bundle summary as JSON")
    p_train.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from simsearch_wsi.io import open_image
    from simsearch_wsi.review.data import train_session
    from simsearch_wsi.review.session import Session
    from simsearch_wsi.train.bundle import save_bundle
    from simsearch_wsi.train.fit import TrainConfig

    session = Session.open(args.session)
    if args.noisy_images:
        args.noisy_images = [i.path for i in images_of(args, args.noisy_images)]
    config = TrainConfig.preset_config(args.preset, strategy=args.strategy).replace(
        head_input=args.head_input, similarity_expert=args.similarity_expert
    )
    out = Path(args.out) if args.out else session.root / "model.zip"
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give a file name such as model.zip")
    guard(
        args,
        outputs=[("--out", out)],
        inputs=[
            *session_file(args.session),
            *[("session image", p) for p in session.images()],
            *[("noisy image", p) for p in args.noisy_images or ()],
        ],
    )
    search = build_search(args)
    with progress() as bars:
        result = train_session(
            session,
            search,
            config=config,
            open_image=lambda p: open_image(p, mpp=args.mpp),
            noisy_images=args.noisy_images or (),
            device=search.extractor.device,
            seed=args.seed,
            progress=bars,
        )
    with naming_output("--out", out):
        save_bundle(out, result.bundle)
    summary = {"model": str(out), **result.bundle.describe()}
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return EXIT_OK
    console = rich_console()
    m = result.metrics
    console.print(f"{out}: model for {', '.join(result.bundle.classes)}", markup=False)
    console.print(f"  strategy {config.strategy}, preset {config.preset}", markup=False)
    for name, stage in m["stages"].items():
        loss = stage.get("loss") or [float("nan")]
        rate = f", {stage['views_per_s']:.0f} views/s" if stage.get("views_per_s") else ""
        console.print(
            f"  {name:<10} {stage['seconds']:.1f} s{rate}, final loss {loss[-1]:.3f}", markup=False
        )
    for key, label in (("baseline_validation", "untrained"), ("validation", "trained")):
        if key in m:
            console.print(
                f"  held-out balanced accuracy ({label} trunk): {m[key]['balanced_accuracy']}",
                markup=False,
            )
    thr = ", ".join(f"{c}={t:.2f}" for c, t in result.bundle.thresholds.items())
    console.print(f"  confidence thresholds: {thr}", markup=False)
    for note in result.notes:
        console.print(f"  note: {note}", markup=False)
    return EXIT_OK
