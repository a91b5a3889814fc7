"""``pretrain``: self-supervised training of the trunk on a cohort's images (masked-image
modelling or SimCLR), written as weights for ``--weights PATH``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simsearch_wsi import __version__
from simsearch_wsi.cli.argtypes import int_at_least
from simsearch_wsi.cli.console import progress, rich_console
from simsearch_wsi.cli.engine import build_search, patch_size_l0
from simsearch_wsi.cli.exitcodes import EXIT_OK
from simsearch_wsi.cli.inputs import guard, images_of
from simsearch_wsi.cli.options import PRESET, SEED, add_patch_size, add_plate_selection
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.pathguard import naming_output

if TYPE_CHECKING:
    from simsearch_wsi.cli.options import Subparsers


def register(sub: Subparsers, engine: argparse.ArgumentParser) -> None:
    """Add ``pretrain`` to the commands."""
    p_pre = sub.add_parser(
        "pretrain",
        parents=[engine],
        help="self-supervised training of the trunk on a cohort (masked or SimCLR)",
        description="Train the trunk on random foreground patches of the images (masked-image "
        "modelling, or SimCLR) and write weights for --weights PATH: weights adapted to your "
        "tissue and stain. Starts from --weights (auto: ImageNet if available, else the "
        "embedded trunk; random: every layer is trained).",
    )
    p_pre.add_argument("images", nargs="+", metavar="IMAGE")
    add_plate_selection(p_pre)
    p_pre.add_argument("--out", required=True, metavar="WEIGHTS.pth")
    add_patch_size(p_pre, "patch size")
    p_pre.add_argument(
        "--patches-per-image",
        type=int_at_least(1),
        default=256,
        help="random foreground patches per image (default: %(default)s)",
    )
    PRESET.add(
        p_pre,
        help="schedule: quick, fast, or the paper's SimCLR stage (100 epochs of batch 128) "
        "(default: %(default)s)",
    )
    p_pre.add_argument(
        "--objective",
        default="masked",
        choices=["simclr", "masked"],
        help="masked-image modelling (predict blanked cells; better search features than SimCLR "
        "at equal time in docs/evaluation.md) or SimCLR (two augmented views) "
        "(default: %(default)s)",
    )
    p_pre.add_argument(
        "--mask-ratio",
        type=float,
        default=0.5,
        help="fraction of trunk cells blanked by --objective masked (default: %(default)s)",
    )
    p_pre.add_argument(
        "--epochs", type=int_at_least(1), default=None, help="override the preset's epochs"
    )
    SEED.add(p_pre)
    p_pre.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from simsearch_wsi.features.preprocess import fit_normalization, resolve_channels
    from simsearch_wsi.io import open_image
    from simsearch_wsi.train.fit import TrainConfig
    from simsearch_wsi.train.pretrain import PretrainConfig, pretrain_trunk, save_pretrained

    if Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out}: is a folder; give a file name such as trunk.pth")
    args.images = [i.path for i in images_of(args, args.images)]
    guard(args, outputs=[("--out", args.out)], inputs=[("image", p) for p in args.images])
    paths = [str(Path(p).resolve()) for p in args.images]
    opened: list[Any] = []
    try:
        for p in paths:
            opened.append(open_image(p, mpp=args.mpp))
        names = opened[0].channel_names
        for p, im in zip(paths, opened, strict=True):
            if len(im.channel_names) != len(names):
                raise ConfigError(
                    f"{p}: has {len(im.channel_names)} channels, {paths[0]} has {len(names)}; "
                    "pretrain on images of one kind"
                )
        channels = (
            [names[i] for i in resolve_channels(names, args.channels.split(","))]
            if args.channels
            else list(names)
        )
        rgb = opened[0].is_brightfield and len(channels) == 3
        normalization = fit_normalization(opened)
        patch_l0 = patch_size_l0(args, opened[0])
    finally:
        for im in opened:
            im.close()
    search = build_search(args)
    ext = search.extractor
    stage = TrainConfig.preset_config(args.preset).selflearn
    if args.epochs is not None:
        stage = dataclasses.replace(stage, epochs=args.epochs, decay_epoch=None)
    config = PretrainConfig(
        patches_per_image=args.patches_per_image,
        stage=stage,
        objective=args.objective,
        mask_ratio=args.mask_ratio,
    )
    with progress() as bars:
        result = pretrain_trunk(
            paths,
            ext,
            normalization=normalization,
            channels=channels,
            rgb=rgb,
            patch_size_l0=patch_l0,
            open_image=lambda p: open_image(p, mpp=args.mpp),
            config=config,
            seed=args.seed,
            progress=bars,
        )
    with naming_output("--out", args.out):
        out = save_pretrained(
            args.out,
            result,
            base=ext,
            extra={
                "images": paths,
                "patch_size_l0": patch_l0,
                "channels": channels,
                "seed": args.seed,
                "config": {
                    "objective": config.objective,
                    "mask_ratio": config.mask_ratio,
                    "patches_per_image": config.patches_per_image,
                    "stage": dataclasses.asdict(config.stage),
                },
                "package_version": __version__,
            },
        )
    st = result.metrics["stage"]
    rich_console().print(
        f"{out}: trunk weights after {st['epochs']} epochs on {result.metrics['patches']} "
        f"patches of {len(paths)} image(s) ({st['seconds']:.0f} s, {st['views_per_s']} views/s, "
        f"loss {st['loss'][0] if st['loss'] else float('nan'):.3f} -> "
        f"{st['loss'][-1] if st['loss'] else float('nan'):.3f}); use it with --weights {out}",
        markup=False,
    )
    for note in result.notes:
        rich_console().print(f"  note: {note}", markup=False)
    return EXIT_OK
