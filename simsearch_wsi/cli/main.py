"""The ``simsearch-wsi`` command line.

Errors the user can fix end in one line on stderr and a non-zero exit code; ``--debug`` shows
the traceback instead. The CLI is where devices, seeds and output are decided; the library
below it takes them as arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from simsearch_wsi import __version__
from simsearch_wsi.core.errors import ConfigError, SimSearchError
from simsearch_wsi.core.pathguard import Named, check_outputs_not_inputs, naming_output
from simsearch_wsi.qupath.geojson import REJECTED_CLASS

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


# --- engine set-up (the CLI decides device, weights, cache folder) -----------------------------
def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "simsearch_wsi" / "features"


def _resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None


def _build_search(args: argparse.Namespace) -> Any:
    import torch

    from simsearch_wsi.features.backbones import build_trunk, resolve_auto_weights
    from simsearch_wsi.features.cache import FeatureCache
    from simsearch_wsi.features.extractor import FeatureExtractor
    from simsearch_wsi.search.engine import SearchSettings, SimSearch

    hub_dir = Path(torch.hub.get_dir())
    weights = args.weights
    if weights == "auto":
        # the CLI decides whether to try the network: SIMSEARCH_WSI_OFFLINE=1 never does
        offline = os.environ.get("SIMSEARCH_WSI_OFFLINE", "").strip() not in ("", "0")
        trunk, spec, info, notice = resolve_auto_weights(
            args.backbone, cache_dir=hub_dir, allow_download=not offline
        )
        if notice:
            print(f"simsearch-wsi: note: {notice}", file=sys.stderr)
    else:
        trunk, spec, info = build_trunk(
            args.backbone, weights, seed=0, cache_dir=hub_dir, allow_download=weights == "imagenet"
        )
    device = _resolve_device(args.device)
    extractor = FeatureExtractor(trunk, spec, info, device=device, autocast=not args.no_autocast)
    cache = FeatureCache(Path(args.cache) if args.cache else _default_cache_dir())
    channels = tuple(args.channels.split(",")) if args.channels else None
    settings = SearchSettings(
        tile_size=args.tile_size,
        batch_size=args.batch_size,
        channels=channels,
        **({"feature_norm": args.feature_norm} if args.feature_norm else {}),
    )
    return SimSearch(extractor, cache, settings)


def _parse_thresholds(items: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = float(value)
            if not math.isfinite(out[name]):
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"--threshold {item!r}: expected CLASS=VALUE, e.g. --threshold Tumor=0.6"
            ) from None
    return out


def _patch_size_l0(args: argparse.Namespace, image: Any) -> float:
    if args.patch_size_um is not None:
        if image.mpp is None:
            raise ConfigError(
                f"{image.path}: --patch-size-um needs the pixel size; pass --mpp or use "
                "--patch-size-px"
            )
        return float(args.patch_size_um / image.mpp)
    return float(args.patch_size_px)


# --- inputs are sacred (simsearch_wsi.core.pathguard) -------------------------------------------------
_WEIGHTS_NAMES = ("auto", "imagenet", "embedded", "random")


def _engine_paths(args: argparse.Namespace) -> tuple[list[Named], list[Named]]:
    """(inputs, folders written into) of the engine options: a ``--weights`` file is read, the
    ``--cache`` folder is written into."""
    weights = getattr(args, "weights", None)
    inputs: list[Named] = [("weights", weights)] if weights not in (None, *_WEIGHTS_NAMES) else []
    cache = getattr(args, "cache", None)
    return inputs, [("--cache", cache)] if cache else []


def _guard(
    args: argparse.Namespace,
    *,
    outputs: Sequence[Named] = (),
    inputs: Sequence[Named] = (),
    into: Sequence[Named] = (),
    updated: Sequence[Named] = (),
) -> None:
    """Refuse, before any work, an output that would replace or land inside an input."""
    engine_inputs, engine_into = _engine_paths(args)
    check_outputs_not_inputs(
        outputs, [*inputs, *engine_inputs], into=[*into, *engine_into], updated=updated
    )


def _session_file(folder: str | None) -> list[Named]:
    from simsearch_wsi.review.session import SESSION_FILE

    return [("session file", Path(folder) / SESSION_FILE)] if folder else []


# --- embed --------------------------------------------------------------------------------------
def _cmd_embed(args: argparse.Namespace) -> int:
    from simsearch_wsi.io import open_image

    _guard(args, inputs=[("image", p) for p in args.images])
    search = _build_search(args)
    console = _console()
    with _progress() as progress:
        for path in args.images:
            with open_image(path, mpp=args.mpp) as img:
                patch_l0 = _patch_size_l0(args, img)
                spec, fmap = search.embed(img, patch_l0, progress=progress)
                search.pool(spec, fmap, patch_l0, progress=progress)
                h, w, d = fmap.shape
                console.print(
                    f"{path}: {w}x{h} cells x {d} features at level {spec.scale.level} "
                    f"(resample {spec.scale.resample:.3g}), {int(fmap.computed.sum())}/"
                    f"{fmap.computed.size} tiles embedded -> {fmap.path}",
                    markup=False,
                )
    return EXIT_OK


# --- suggest ------------------------------------------------------------------------------------
def _cmd_suggest(args: argparse.Namespace) -> int:
    from simsearch_wsi.io import open_image
    from simsearch_wsi.qupath.geojson import read_annotations, write_feature_collection
    from simsearch_wsi.review.session import Session, suggest_with_session

    thresholds = _parse_thresholds(args.threshold)
    if args.annotations is None and args.session is None and args.qpproj is None:
        raise ConfigError(
            "suggest needs --annotations IN.geojson (prototypes), --qpproj PROJECT, or "
            "--session DIR with saved prototypes"
        )
    if args.out is None and args.qpproj is None:
        raise ConfigError("suggest needs --out OUT.geojson (or --qpproj PROJECT to write into)")
    _guard(
        args,
        outputs=[("--out", args.out)],
        inputs=[("image", args.image), ("annotations", args.annotations)],
        updated=_session_file(args.session),
    )
    skipped: list[str] = []
    annotations = read_annotations(args.annotations, skipped=skipped) if args.annotations else None
    if args.qpproj is not None and annotations is None:
        annotations = list(_project_objects(args.qpproj, args.image))
    with naming_output("--session", args.session):
        session = Session.create(args.session, exist_ok=True) if args.session else None
    search = _build_search(args)
    with (
        open_image(args.image, mpp=args.mpp) as img,
        _progress() as progress,
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
            progress=progress,
        )
    if args.out is not None:
        with naming_output("--out", args.out):
            write_feature_collection(args.out, result.geojson_features())
    if args.qpproj is not None:
        from simsearch_wsi.qupath.geojson import BACKGROUND_CLASS
        from simsearch_wsi.qupath.project import write_objects

        write_objects(
            args.qpproj,
            args.image,
            result.geojson_features(),
            replace_classes={*result.classes, BACKGROUND_CLASS},
        )
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        console = _console()
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
        for note in result.notes:
            console.print(f"  note: {note}", markup=False)
    _report_skipped(skipped)
    return EXIT_OK


def _project_objects(project: str, image: str) -> Any:
    from simsearch_wsi.qupath.project import find_image, read_project

    return find_image(read_project(project), image).annotations


def _report_skipped(skipped: list[str]) -> None:
    """Objects of the input that could not be read were left out; say so on stderr."""
    if skipped:
        print(
            f"simsearch-wsi: note: {len(skipped)} object(s) left out, e.g. {skipped[0]}",
            file=sys.stderr,
        )


# --- review / background / session -------------------------------------------------------------
def _cmd_review(args: argparse.Namespace) -> int:
    from simsearch_wsi.io import open_image
    from simsearch_wsi.qupath.geojson import read_annotations
    from simsearch_wsi.review.session import Session

    if (args.annotations is None) == (args.qpproj is None):
        raise ConfigError(
            "review needs exactly one of --annotations REVIEWED.geojson or --qpproj PROJECT"
        )
    _guard(
        args,
        inputs=[("image", args.image), ("annotations", args.annotations)],
        updated=_session_file(args.session),
    )
    session = Session.open(args.session)
    skipped: list[str] = []
    annotations = (
        read_annotations(args.annotations, skipped=skipped)
        if args.annotations is not None
        else list(_project_objects(args.qpproj, args.image))
    )
    with open_image(args.image) as img:  # checks the image exists and is readable
        report = session.ingest_review(
            img.path,
            annotations,
            source=str(args.annotations or args.qpproj),
            image_size_l0=img.dimensions,
        )
    with naming_output("--session", args.session):
        session.save()
    _report_skipped(skipped)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return EXIT_OK
    console = _console()
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

    _guard(
        args,
        outputs=[("--out", args.out)],
        inputs=[("image", args.image)],
        updated=_session_file(args.session),
    )
    session = Session.open(args.session)
    search = _build_search(args)
    with (
        open_image(args.image, mpp=args.mpp) as img,
        _progress() as progress,
        naming_output("--session", args.session),
    ):
        result = background_with_session(search, img, session=session, n=args.n, progress=progress)
    with naming_output("--out", args.out):
        write_feature_collection(args.out, result.geojson_features())
    _console().print(f"{args.out}: {len(result.background)} background candidates", markup=False)
    return EXIT_OK


def _cmd_session_show(args: argparse.Namespace) -> int:
    from simsearch_wsi.review.session import Session

    summary = Session.open(args.dir).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    console = _console()
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


# --- train / pretrain -----------------------------------------------------------------------------
def _cmd_train(args: argparse.Namespace) -> int:
    from simsearch_wsi.io import open_image
    from simsearch_wsi.review.data import train_session
    from simsearch_wsi.review.session import Session
    from simsearch_wsi.train.bundle import save_bundle
    from simsearch_wsi.train.fit import TrainConfig

    session = Session.open(args.session)
    config = TrainConfig.preset_config(args.preset, strategy=args.strategy).replace(
        head_input=args.head_input
    )
    out = Path(args.out) if args.out else session.root / "model.zip"
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give a file name such as model.zip")
    _guard(
        args,
        outputs=[("--out", out)],
        inputs=[
            *_session_file(args.session),
            *[("session image", p) for p in session.images()],
            *[("noisy image", p) for p in args.noisy_images or ()],
        ],
    )
    search = _build_search(args)
    with _progress() as progress:
        result = train_session(
            session,
            search,
            config,
            open_image=lambda p: open_image(p, mpp=args.mpp),
            noisy_images=args.noisy_images or (),
            device=search.extractor.device,
            seed=args.seed,
            progress=progress,
        )
    with naming_output("--out", out):
        save_bundle(out, result.bundle)
    summary = {"model": str(out), **result.bundle.describe()}
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return EXIT_OK
    console = _console()
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


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from simsearch_wsi.features.preprocess import fit_normalization, resolve_channels
    from simsearch_wsi.io import open_image
    from simsearch_wsi.train.fit import TrainConfig
    from simsearch_wsi.train.pretrain import PretrainConfig, pretrain_trunk, save_pretrained

    if Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out}: is a folder; give a file name such as trunk.pth")
    _guard(args, outputs=[("--out", args.out)], inputs=[("image", p) for p in args.images])
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
        patch_l0 = _patch_size_l0(args, opened[0])
    finally:
        for im in opened:
            im.close()
    search = _build_search(args)
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
    with _progress() as progress:
        result = pretrain_trunk(
            paths,
            trunk=ext.trunk,
            spec=ext.spec,
            weights=ext.weights,
            normalization=normalization,
            channels=channels,
            rgb=rgb,
            patch_size_l0=patch_l0,
            open_image=lambda p: open_image(p, mpp=args.mpp),
            config=config,
            device=ext.device,
            seed=args.seed,
            progress=progress,
        )
    with naming_output("--out", args.out):
        out = save_pretrained(
            args.out,
            result,
            backbone=ext.spec.name,
            base_weights=ext.weights,
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
    _console().print(
        f"{out}: trunk weights after {st['epochs']} epochs on {result.metrics['patches']} "
        f"patches of {len(paths)} image(s) ({st['seconds']:.0f} s, {st['views_per_s']} views/s, "
        f"loss {st['loss'][0] if st['loss'] else float('nan'):.3f} -> "
        f"{st['loss'][-1] if st['loss'] else float('nan'):.3f}); use it with --weights {out}",
        markup=False,
    )
    for note in result.notes:
        _console().print(f"  note: {note}", markup=False)
    return EXIT_OK


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
    from simsearch_wsi.train.bundle import load_bundle

    bundle = load_bundle(args.model)
    thresholds = _parse_thresholds(args.threshold or [])
    check_thresholds(thresholds, bundle.classes)
    out = Path(args.out)
    targets = expand_inputs(list(args.images))
    refuse_overwriting_inputs(targets, out, inputs=[("model", args.model)])
    _guard(args, inputs=[("image", p) for p in args.images])  # --cache is written into
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; give an output folder")
    if args.qpproj is not None:
        from simsearch_wsi.qupath.project import read_project

        read_project(args.qpproj)  # fails early (and clearly) without paquo/QuPath
    model = PatchModel(
        bundle,
        device=_resolve_device(args.device),
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
    )
    with _progress() as progress, naming_output("--out", out):
        results = predict_images(
            targets,
            model,
            out,
            open_image=lambda p: open_image(p, mpp=args.mpp),
            settings=settings,
            resume=not args.force,
            progress=progress,
        )
    if args.qpproj is not None:
        from simsearch_wsi.qupath.geojson import BACKGROUND_CLASS
        from simsearch_wsi.qupath.project import write_objects

        for r in results:
            doc = json.loads(Path(r.outputs["geojson"]).read_text(encoding="utf-8"))
            write_objects(
                args.qpproj,
                r.image,
                doc["features"],
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
    console = _console()
    for r in results:
        counts = ", ".join(f"{c} {n}" for c, n in r.n_detections.items())
        when = "unchanged, kept" if r.reused else f"{r.seconds:.1f} s"
        console.print(f"{r.image}: detections {counts} ({when})", markup=False)
        for kind, path in r.outputs.items():
            console.print(f"  {kind:<9} {path}", markup=False)
    console.print(f"{table}: one row per image and class", markup=False)
    return EXIT_OK


def _cohort_device(name: str, *, local: bool) -> tuple[str, list[int]]:
    """The device the workers use and, for a local CUDA cluster, the GPUs (one worker each).

    With ``--scheduler`` the workers may have GPUs the driver lacks, so only the name is
    checked here; the tasks then ask for the ``GPU`` resource.
    """
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: cohort runs on cpu or cuda[:N]")
    if device.type == "cpu" or not local:
        return str(device), []
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here; use --device cpu")
    gpus = [device.index] if device.index is not None else list(range(torch.cuda.device_count()))
    return "cuda", gpus  # each worker sees only its GPU, as cuda:0


def _start_cluster(args: argparse.Namespace, gpus: Sequence[int]) -> tuple[Any, Any]:
    """(client, cluster to close or None) for ``--scheduler`` or a local cluster."""
    from simsearch_wsi.cohort.cluster import import_distributed, start_local_cluster

    if args.scheduler:
        distributed = import_distributed()
        try:
            return distributed.Client(args.scheduler, timeout="30s"), None
        except (OSError, TimeoutError) as exc:
            raise ConfigError(
                f"--scheduler {args.scheduler}: cannot connect ({exc}); start the scheduler "
                "first ('dask scheduler') and give its tcp://HOST:PORT address"
            ) from None
    if gpus and args.workers is not None:
        gpus = list(gpus)[: args.workers]
    return start_local_cluster(args.workers or 2, cores=os.cpu_count() or 1, gpus=gpus)


def _cmd_cohort(args: argparse.Namespace) -> int:
    from simsearch_wsi.cohort.run import (
        COHORT_OUTPUTS,
        CohortEntry,
        cohort_targets,
        read_manifest,
        run_cohort,
    )
    from simsearch_wsi.infer.predict import (
        PredictSettings,
        check_thresholds,
        refuse_overwriting_inputs,
    )
    from simsearch_wsi.train.bundle import load_bundle

    if (args.manifest is None) == (not args.images):
        raise ConfigError("cohort needs either --manifest FILE.csv or IMAGE paths (not both)")
    entries = (
        read_manifest(args.manifest) if args.manifest else [CohortEntry(p) for p in args.images]
    )
    bundle = load_bundle(args.model)
    thresholds = _parse_thresholds(args.threshold or [])
    check_thresholds(thresholds, bundle.classes)
    out = Path(args.out)
    targets = cohort_targets(entries)
    refuse_overwriting_inputs(
        targets,
        out,
        inputs=[("model", args.model), ("manifest", args.manifest)],
        outputs=COHORT_OUTPUTS,
    )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; give an output folder")
    device, gpus = _cohort_device(args.device, local=not args.scheduler)
    settings = PredictSettings(thresholds=thresholds, write_back=args.write_back)
    client, cluster = _start_cluster(args, gpus)
    arguments = {k: v for k, v in vars(args).items() if k != "func"}
    try:
        with _CohortBar() as progress, naming_output("--out", out):
            result = run_cohort(
                targets,
                bundle,
                out,
                client=client,
                settings=settings,
                overwrite=args.overwrite,
                device=device,
                autocast=not args.no_autocast,
                resources={"GPU": 1} if device.startswith("cuda") else None,
                group_by=args.group_by,
                dose_column=args.dose_column,
                arguments=arguments,
                progress=progress,
            )
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    console = _console()
    counts = result.summary
    console.print(
        f"{counts['total']} images: {counts['done']} done, {counts['reused']} already "
        f"finished, {counts['failed']} failed",
        markup=False,
    )
    for image in result.failed:
        console.print(f"  failed {image.path}: {image.error}", markup=False)
    table = result.table or "none (no image finished)"
    console.print(f"table {table}; run record {result.metadata}", markup=False)
    if result.plots:
        console.print("plots " + ", ".join(str(p) for p in result.plots.values()), markup=False)
    return EXIT_ERROR if result.failed else EXIT_OK


class _CohortBar:
    """done / failed / remaining with ETA, for ``cohort``."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(), transient=False
        )
        self._task: Any = None

    def __call__(self, done: int, failed: int, total: int) -> None:
        text = f"images: {done - failed} done, {failed} failed, {total - done} remaining"
        if self._task is None:
            self._task = self._progress.add_task(text, total=total)
        self._progress.update(self._task, completed=done, description=text)

    def __enter__(self) -> _CohortBar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


# --- serve --------------------------------------------------------------------------------------
def _cmd_serve(args: argparse.Namespace) -> int:
    from simsearch_wsi.server.app import create_app, is_loopback, serve

    token = args.token or os.environ.get("SIMSEARCH_WSI_TOKEN") or None
    if not is_loopback(args.host) and not token:
        raise ConfigError(
            f"--host {args.host} exposes the server beyond this machine: also pass --token "
            "SECRET (or set SIMSEARCH_WSI_TOKEN), and put the same token in the QuPath scripts"
        )
    roots = [Path(p).resolve() for p in (args.allow or [os.getcwd()])]
    for root in roots:
        if not root.is_dir():
            raise ConfigError(f"--allow {root}: not a folder; pass folders holding your images")
    search = _build_search(args)
    app = create_app(
        search,
        allowed_roots=roots,
        token=token,
        max_body_bytes=int(args.max_body_mb * 2**20),
        job_workers=args.job_workers,
    )
    print(
        f"simsearch-wsi: serving http://{args.host}:{args.port}/api/v1 (docs at /api/v1/docs); "
        f"images and sessions allowed under: {', '.join(str(r) for r in roots)}; "
        f"token {'required' if token else 'not required (loopback only)'}; Ctrl-C stops",
        file=sys.stderr,
    )
    serve(app, host=args.host, port=args.port)
    return EXIT_OK


# --- evaluate -----------------------------------------------------------------------------------
def _cmd_evaluate(args: argparse.Namespace) -> int:
    import time

    from simsearch_wsi.core.atomic import write_json_atomic
    from simsearch_wsi.eval.ablation import AblationConfig, run_ablation
    from simsearch_wsi.eval.benchmark import read_benchmark_csv, synthetic_benchmark
    from simsearch_wsi.eval.report import summarize, summary_markdown, write_report
    from simsearch_wsi.io import open_image

    out = Path(args.out)
    config = AblationConfig(
        strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
        prototypes=tuple(args.prototypes),
        negatives=tuple(args.negatives),
        repeats=args.repeats,
        seed=args.seed,
        preset=args.preset,
        background=args.background,
    )
    report_files = ("runs.csv", "summary.csv", "summary.md", "pr_auc.png", "evaluation.json")
    outputs: list[Named] = [("--out", out / name) for name in report_files]
    _guard(args, outputs=outputs, inputs=[("benchmark", args.benchmark)], into=[("--out", out)])
    if args.benchmark:
        classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
        benchmark = read_benchmark_csv(
            args.benchmark,
            patch_size_l0=args.patch_size_px,
            classes=classes,
            mask_downsample=args.mask_downsample,
        )
    else:
        benchmark = synthetic_benchmark(out / "data", seed=args.seed)
    if args.benchmark:  # every image and truth file the manifest names
        read: list[Named] = [("benchmark image", p) for p in benchmark.unlabelled]
        for t in (*benchmark.review, *benchmark.test):
            read += [("benchmark image", t.path), ("truth", t.truth.source)]
        _guard(args, outputs=outputs, inputs=read, into=[("--out", out)])
    if args.cache is None:  # an evaluation keeps its features with its results
        args.cache = str(out / "feature_cache")
    search = _build_search(args)
    mpp = {str(Path(t.path).resolve()): t.mpp for t in (*benchmark.review, *benchmark.test)}

    def opener(path: str | os.PathLike[str]) -> Any:
        return open_image(path, mpp=mpp.get(str(Path(path).resolve())) or args.mpp)

    t0 = time.perf_counter()
    results = []
    with _progress() as progress, naming_output("--out", out):
        for result in run_ablation(
            benchmark,
            config,
            search,
            out,
            open_image=opener,
            device=search.extractor.device,
            resume=not args.no_resume,
            run_missing=not args.report_only,
            progress=progress,
        ):
            results.append(result)
    with naming_output("--out", out):
        files = write_report(results, benchmark.classes, out)
    record = {
        "benchmark": benchmark.to_dict(),
        "config": config.to_dict(),
        "weights": search.extractor.weights.description,
        "device": str(search.extractor.device),
        "runs": len(results),
        "reused": sum(r.reused for r in results),
        "seconds": round(time.perf_counter() - t0, 1),
        "files": {k: str(v) for k, v in files.items()},
    }
    with naming_output("--out", out):
        files["record"] = write_json_atomic(out / "evaluation.json", record)
    if args.json:
        print(json.dumps(record, indent=2))
        return EXIT_OK
    console = _console()
    console.print(
        f"evaluate: {benchmark.name}, {len(results)} runs ({record['reused']} reused) in "
        f"{record['seconds']} s; weights: {record['weights']}",
        markup=False,
    )
    console.print(summary_markdown(summarize(results, benchmark.classes), benchmark.classes))
    for role, path in files.items():
        console.print(f"  {role:<8} {path}", markup=False)
    return EXIT_OK


# --- demo ---------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    from simsearch_wsi.demo import EXAMPLES_DIR, HE_PROTOTYPES, IHC_PROTOTYPES, run_demo

    console = _console()
    examples = Path(args.examples) if args.examples else EXAMPLES_DIR
    # the inputs are the prototype files (an output folder beside them inside the examples
    # folder overwrites nothing; a missing file is the demo's own one-line error)
    _guard(
        args,
        inputs=[("prototypes", examples / name) for name in (HE_PROTOTYPES, IHC_PROTOTYPES)],
        into=[("--out", args.out)],
    )
    if args.cache is None:  # keep the demo self-contained
        args.cache = str(Path(args.out) / "feature_cache")
    search = _build_search(args)
    with _progress() as progress, naming_output("--out", args.out):
        result = run_demo(
            Path(args.out),
            seed=args.seed,
            search=search,
            examples_dir=examples,
            device=search.extractor.device,
            progress=progress,
        )
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
            TextColumn("{task.description:<44}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=_console(stderr=True),
            transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        # "supcon | epoch 3/16 loss 2.345": one bar per stage, its text updated
        key = stage.split(" | ", 1)[0]
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task(stage, total=total)
        self._progress.update(self._tasks[key], completed=done, total=total, description=stage)

    def __enter__(self) -> _RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


def _progress() -> _RichProgress:
    return _RichProgress()


# --- parser -------------------------------------------------------------------------------------
def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be >= {minimum}")
        return value

    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number >= 0")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def _add_patch_size_args(parser: argparse.ArgumentParser, what: str) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--patch-size-px",
        type=_positive_float,
        default=64.0,
        help=f"{what} in level-0 pixels; fixes the analysis scale (default: %(default)s)",
    )
    size.add_argument(
        "--patch-size-um", type=_positive_float, default=None, help=f"{what} in micrometres"
    )


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

    engine = argparse.ArgumentParser(add_help=False)
    g = engine.add_argument_group("engine")
    g.add_argument(
        "--weights",
        default="auto",
        help="trunk weights: auto (ImageNet from the torch cache, else downloaded when online, "
        "else the embedded self-supervised trunk; SIMSEARCH_WSI_OFFLINE=1 skips the download), "
        "imagenet (download if missing), embedded, random, or a .pth file "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--feature-norm",
        default=None,
        metavar="{none,standardize,whiten}",
        help="feature normalisation before the cosine, each image with its own statistics "
        "(default: the one docs/evaluation.md measured best, see simsearch_wsi.features.norm)",
    )
    g.add_argument(
        "--backbone", default="resnet18-l3", help="registered backbone (default: %(default)s)"
    )
    g.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: %(default)s)"
    )
    g.add_argument(
        "--cache",
        default=None,
        help="feature cache folder (default: ~/.cache/simsearch_wsi/features)",
    )
    g.add_argument(
        "--tile-size",
        type=_int_at_least(16),
        default=1024,
        help="tile side in analysis pixels, a multiple of 16 (default: %(default)s)",
    )
    g.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=4,
        help="tiles per batch (default: %(default)s)",
    )
    g.add_argument(
        "--no-autocast",
        action="store_true",
        help="run the trunk in float32 (default: bf16 on CPU, fp16 on CUDA)",
    )
    g.add_argument(
        "--channels",
        default=None,
        help="comma-separated channel names or indices to use (default: all)",
    )
    g.add_argument(
        "--mpp",
        type=_positive_float,
        default=None,
        help="level-0 pixel size in um/px when the file has none",
    )

    p_embed = sub.add_parser(
        "embed",
        parents=[engine],
        help="compute and cache dense features of images",
        description="Fill the feature cache for each image (foreground tiles only) so that later "
        "suggest calls with the same patch size answer without re-embedding.",
    )
    p_embed.add_argument("images", nargs="+", metavar="IMAGE")
    _add_patch_size_args(p_embed, "expected prototype size")
    p_embed.set_defaults(func=_cmd_embed)

    p_sug = sub.add_parser(
        "suggest",
        parents=[engine],
        help="find patches similar to prototype rectangles",
        description="Read QuPath annotations (classified rectangles are prototypes), find "
        "similar patches on the image and write them as QuPath detections with 'similarity' and "
        "'rank' measurements.",
    )
    p_sug.add_argument("image", metavar="IMAGE")
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
    p_sug.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="CLASS=VALUE",
        help="minimum similarity per class (repeatable; default 0.5)",
    )
    p_sug.add_argument(
        "--background",
        type=_int_at_least(0),
        default=0,
        metavar="N",
        help="also propose N most and N least similar unlabelled patches as "
        "'background' candidates",
    )
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
    p_sug.set_defaults(func=_cmd_suggest)

    p_rev = sub.add_parser(
        "review",
        help="ingest the user's decisions on suggestions (QuPath GeoJSON export)",
        description="Read the objects exported from QuPath after review: suggestions left in "
        f"place are approved (at or above the class threshold), suggestions given the class "
        f"'{REJECTED_CLASS}' are negatives of their class, relabelled ones become positives "
        "of the new class, deleted ones stay unreviewed; new classified rectangles become "
        "prototypes. Re-ingesting the same file changes nothing.",
    )
    p_rev.add_argument("image", metavar="IMAGE")
    p_rev.add_argument("--annotations", default=None, metavar="REVIEWED.geojson")
    p_rev.add_argument(
        "--qpproj",
        default=None,
        metavar="PROJECT",
        help="read the decisions from a QuPath project instead (needs paquo and QuPath: "
        "extra 'qupath')",
    )
    p_rev.add_argument("--session", required=True, metavar="DIR")
    p_rev.add_argument("--json", action="store_true", help="print the report as JSON")
    p_rev.set_defaults(func=_cmd_review)

    p_bg = sub.add_parser(
        "background",
        parents=[engine],
        help="propose background patches for the user to confirm",
        description="Propose the N unlabelled patches most similar and the N least similar to "
        "the mean of the session's prototypes, as detections of class 'background'.",
    )
    p_bg.add_argument("image", metavar="IMAGE")
    p_bg.add_argument("--session", required=True, metavar="DIR")
    p_bg.add_argument("--out", required=True, metavar="OUT.geojson")
    p_bg.add_argument(
        "--n", type=_int_at_least(1), default=10, help="candidates of each kind (default 10)"
    )
    p_bg.set_defaults(func=_cmd_background)

    p_ses = sub.add_parser("session", help="inspect a review session")
    ses_sub = p_ses.add_subparsers(dest="session_command", metavar="ACTION")
    p_show = ses_sub.add_parser("show", help="classes, thresholds, counts, reviewed images")
    p_show.add_argument("dir", metavar="DIR")
    p_show.add_argument("--json", action="store_true")
    p_show.set_defaults(func=_cmd_session_show)

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
        default="pos+neg+selflearn",
        choices=["pos", "pos+neg", "pos+selflearn", "pos+neg+selflearn"],
        help="which data to train on (default: %(default)s)",
    )
    p_train.add_argument(
        "--preset",
        default="fast",
        choices=["quick", "fast", "paper"],
        help="fast: minutes on a laptop CPU; paper: the SimSearch paper's epochs and schedules "
        "(default: %(default)s)",
    )
    p_train.add_argument(
        "--head-input",
        default="trunk",
        choices=["trunk", "search", "auto"],
        help="trunk: fine-tune the trunk (the paper's stages); search: a head on the search's own "
        "window vectors (seconds, no trunk training); auto: both, the better on held-out "
        "patches kept (default: %(default)s; docs/evaluation.md, 'Training study')",
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
    p_train.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p_train.add_argument("--json", action="store_true", help="print the bundle summary as JSON")
    p_train.set_defaults(func=_cmd_train)

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
    p_pre.add_argument("--out", required=True, metavar="WEIGHTS.pth")
    _add_patch_size_args(p_pre, "patch size")
    p_pre.add_argument(
        "--patches-per-image",
        type=_int_at_least(1),
        default=256,
        help="random foreground patches per image (default: %(default)s)",
    )
    p_pre.add_argument(
        "--preset",
        default="fast",
        choices=["quick", "fast", "paper"],
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
        "--epochs", type=_int_at_least(1), default=None, help="override the preset's epochs"
    )
    p_pre.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p_pre.set_defaults(func=_cmd_pretrain)

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
        "images", nargs="+", metavar="IMAGE", help="slides, images, OME-Zarr images or plates"
    )
    p_pred.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="feature cache for models trained with --head-input search (they read the search's "
        "features: pass the search's --cache to reuse them; default: a temporary folder per image)",
    )
    p_pred.add_argument("--model", required=True, metavar="MODEL.zip", help="a trained bundle")
    p_pred.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p_pred.add_argument(
        "--threshold",
        action="append",
        metavar="CLASS=P",
        help="confidence threshold of a class (default: the model's), repeatable",
    )
    p_pred.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: %(default)s)"
    )
    p_pred.add_argument("--no-autocast", action="store_true", help="run the trunk in float32")
    p_pred.add_argument(
        "--tile-size",
        type=_int_at_least(64),
        default=1024,
        help="tile side in analysis pixels (default: %(default)s)",
    )
    p_pred.add_argument(
        "--batch-size", type=_int_at_least(1), default=4, help="tiles per batch (default: 4)"
    )
    p_pred.add_argument(
        "--simplify-px",
        type=_non_negative_float,
        default=1.0,
        help="polygon simplification tolerance in mask pixels (default: %(default)s)",
    )
    p_pred.add_argument(
        "--min-area-um2",
        type=_non_negative_float,
        default=0.0,
        help="drop segmentation pieces (and fill holes) under this area (default: %(default)s)",
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
    p_pred.add_argument("--force", action="store_true", help="redo images already done")
    p_pred.add_argument(
        "--mpp", type=_positive_float, default=None, help="level-0 um/px when the file has none"
    )
    p_pred.add_argument("--json", action="store_true", help="print the results as JSON")
    p_pred.set_defaults(func=_cmd_predict)

    p_coh = sub.add_parser(
        "cohort",
        help="run a model over many slides and plates on Dask (resumable, failures isolated)",
        description="Run a model bundle over a cohort on Dask distributed: a local cluster of "
        "worker processes (--workers) or any running scheduler (--scheduler). Each image gets "
        "what predict writes; quantification.csv gathers every finished image with the "
        "manifest's metadata, run_metadata.json records the run. A re-run skips finished "
        "images; a failing image is reported and does not stop the others (exit code 1).",
    )
    p_coh.add_argument("images", nargs="*", metavar="IMAGE", help="images or plates")
    p_coh.add_argument(
        "--manifest", default=None, metavar="FILE.csv", help="CSV with a path column + metadata"
    )
    p_coh.add_argument("--model", required=True, metavar="MODEL.zip", help="a trained bundle")
    p_coh.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p_coh.add_argument(
        "--workers",
        type=_int_at_least(1),
        default=None,
        help="local worker processes (default: 2; with --device cuda one per GPU)",
    )
    p_coh.add_argument(
        "--scheduler", default=None, metavar="ADDRESS", help="a running Dask scheduler instead"
    )
    p_coh.add_argument("--overwrite", action="store_true", help="redo finished images too")
    p_coh.add_argument(
        "--threshold", action="append", metavar="CLASS=P", help="confidence threshold, repeatable"
    )
    p_coh.add_argument("--write-back", action="store_true", help="labels into OME-Zarr inputs")
    p_coh.add_argument(
        "--device",
        default="cpu",
        help="cpu, or cuda[:N]: tasks then ask for the workers' GPU resource (default: cpu)",
    )
    p_coh.add_argument("--no-autocast", action="store_true", help="run the trunk in float32")
    p_coh.add_argument(
        "--group-by",
        default=None,
        metavar="COLUMN",
        help="manifest column grouping the images in the plots (default: the first repeated one)",
    )
    p_coh.add_argument(
        "--dose-column",
        default=None,
        metavar="COLUMN",
        help="manifest column for the dose-response plot (default: 'dose' or 'concentration')",
    )
    p_coh.set_defaults(func=_cmd_cohort)

    p_srv = sub.add_parser(
        "serve",
        parents=[engine],
        help="run the local HTTP server the QuPath scripts talk to",
        description="Serve the review loop (suggest, review, background, session) and long "
        "jobs (embed, train, predict) over HTTP with models and feature caches kept warm. Binds "
        "to loopback; any other host needs a token. Only images, sessions, models and output "
        "folders under --allow folders are used.",
    )
    p_srv.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    p_srv.add_argument(
        "--port", type=_int_at_least(1), default=8765, help="port (default: %(default)s)"
    )
    p_srv.add_argument(
        "--allow",
        action="append",
        metavar="DIR",
        help="folder whose images, sessions, models and outputs may be used (repeatable; "
        "default: the current folder)",
    )
    p_srv.add_argument(
        "--token",
        default=None,
        help="require 'Authorization: Bearer TOKEN' (or set SIMSEARCH_WSI_TOKEN)",
    )
    p_srv.add_argument(
        "--max-body-mb",
        type=_positive_float,
        default=32.0,
        help="largest request body in MB (default: %(default)s)",
    )
    p_srv.add_argument(
        "--job-workers",
        type=_int_at_least(1),
        default=1,
        help="background jobs run at once (default: %(default)s)",
    )
    p_srv.set_defaults(func=_cmd_serve)

    p_eval = sub.add_parser(
        "evaluate",
        parents=[engine],
        help="score the method with a simulated user (the paper's ablation)",
        description="Play the user of the SimSearch paper on images with ground truth: P random "
        "prototypes per class, the similarity threshold lowered until N wrong suggestions are "
        "flagged, the rest approved; train each strategy and score PR-AUC per class (and IoU "
        "where the truth is a mask) on held-out images, over repeats. Writes runs.csv, "
        "summary.csv, summary.md and pr_auc.png; finished runs are reused on a re-run.",
    )
    src = p_eval.add_mutually_exclusive_group()
    src.add_argument(
        "--synthetic",
        action="store_true",
        help="generate the synthetic benchmark (default when no --benchmark is given)",
    )
    src.add_argument(
        "--benchmark",
        metavar="MANIFEST.csv",
        default=None,
        help="CSV with image, role (review, unlabelled, test), truth (CSV, GeoJSON or label "
        "mask) and optional mpp columns",
    )
    p_eval.add_argument("--out", required=True, metavar="DIR", help="folder for the results")
    p_eval.add_argument(
        "--strategies",
        default="search,pos,pos+neg,pos+selflearn,pos+neg+selflearn",
        help="comma-separated (default: %(default)s); search = the similarity search alone",
    )
    p_eval.add_argument(
        "--prototypes",
        nargs="+",
        type=_int_at_least(1),
        default=[5, 10],
        metavar="P",
        help="prototypes per class (default: 5 10)",
    )
    p_eval.add_argument(
        "--negatives",
        nargs="+",
        type=_int_at_least(0),
        default=[0, 5],
        metavar="N",
        help="wrong suggestions flagged per class (default: 0 5)",
    )
    p_eval.add_argument(
        "--repeats", type=_int_at_least(1), default=3, help="repeats (default: %(default)s)"
    )
    p_eval.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p_eval.add_argument(
        "--preset", default="fast", choices=["quick", "fast", "paper"], help="training preset"
    )
    p_eval.add_argument(
        "--background",
        type=_int_at_least(0),
        default=8,
        help="background candidates reviewed per image, each end (default: %(default)s)",
    )
    p_eval.add_argument(
        "--patch-size-px",
        type=_positive_float,
        default=64.0,
        help="with --benchmark: the prototype square in level-0 pixels (default: %(default)s)",
    )
    p_eval.add_argument(
        "--classes",
        default=None,
        help="with --benchmark: classes scored, in order (label 1, 2, ... of mask truth)",
    )
    p_eval.add_argument(
        "--mask-downsample",
        type=_positive_float,
        default=1.0,
        help="with --benchmark: level-0 pixels per pixel of mask truth (default: 1)",
    )
    p_eval.add_argument("--no-resume", action="store_true", help="rerun finished runs too")
    p_eval.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: report the finished runs of OUT (e.g. of a stopped ablation)",
    )
    p_eval.add_argument("--json", action="store_true", help="print the record as JSON")
    p_eval.set_defaults(func=_cmd_evaluate)

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
    p_demo.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    p_demo.add_argument(
        "--examples",
        default=None,
        metavar="DIR",
        help="folder with the prototypes' GeoJSON files (default: the repository's examples/)",
    )
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
