"""``cohort``: run a model bundle over many slides and plates on Dask (a local cluster or a
running scheduler), resumable, with failing images reported and the others finished."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simsearch_wsi.cli.argtypes import int_at_least
from simsearch_wsi.cli.console import rich_console
from simsearch_wsi.cli.exitcodes import EXIT_ERROR, EXIT_OK
from simsearch_wsi.cli.options import (
    ALL_TILES,
    DEVICE,
    FORCE,
    MANIFEST,
    MPP,
    NO_AUTOCAST,
    THRESHOLD,
    parse_device,
    parse_thresholds,
)
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.pathguard import naming_output

if TYPE_CHECKING:
    from simsearch_wsi.cli.options import Subparsers
    from simsearch_wsi.cohort.run import CohortTick


def register(sub: Subparsers, engine: argparse.ArgumentParser) -> None:
    """Add ``cohort`` to the commands (the model bundle fixes trunk, weights and channels)."""
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
    MANIFEST.add(p_coh)
    p_coh.add_argument("--model", required=True, metavar="MODEL.zip", help="a trained bundle")
    p_coh.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p_coh.add_argument(
        "--workers",
        type=int_at_least(1),
        default=None,
        help="local worker processes (default: 2; with --device cuda one per GPU)",
    )
    p_coh.add_argument(
        "--scheduler", default=None, metavar="ADDRESS", help="a running Dask scheduler instead"
    )
    FORCE.add(p_coh)
    MPP.add(
        p_coh,
        help="level-0 pixel size in um/px for images whose file has none (replaces the file's); "
        "a manifest 'mpp' column gives it per image",
    )
    THRESHOLD.add(p_coh)
    p_coh.add_argument("--write-back", action="store_true", help="labels into OME-Zarr inputs")
    DEVICE.add(
        p_coh,
        default="cpu",
        help="cpu, or cuda[:N]: tasks then ask for the workers' GPU resource (default: cpu)",
    )
    NO_AUTOCAST.add(p_coh, help="run the trunk in float32")
    ALL_TILES.add(p_coh)
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


def _cmd_cohort(args: argparse.Namespace) -> int:
    from simsearch_wsi.cohort.run import (
        CohortEntry,
        cohort_outputs,
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
        read_manifest(args.manifest, cohort=True)
        if args.manifest
        else [CohortEntry(os.path.abspath(p)) for p in args.images]
    )
    bundle = load_bundle(args.model)
    thresholds = parse_thresholds(args.threshold or [])
    check_thresholds(thresholds, bundle.classes)
    out = Path(os.path.abspath(args.out))  # the workers may run in other folders
    targets = cohort_targets(entries, mpp=args.mpp)
    refuse_overwriting_inputs(
        targets,
        out,
        inputs=[("model", args.model), ("manifest", args.manifest)],
        outputs=cohort_outputs(targets),
    )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; give an output folder")
    device, gpus = _worker_device(args.device, local=not args.scheduler)
    settings = PredictSettings(
        thresholds=thresholds,
        write_back=args.write_back,
        tiles="all" if args.all_tiles else "foreground",
    )
    arguments = {k: v for k, v in vars(args).items() if k != "func"}
    started: list[tuple[Any, Any]] = []  # (client, cluster), only once there is work

    def connect() -> Any:
        started.append(_start_cluster(args, gpus))
        return started[0][0]

    display: _CohortBar | _CohortLog = _CohortBar() if sys.stdout.isatty() else _CohortLog()
    try:
        with display, naming_output("--out", out):
            result = run_cohort(
                targets,
                bundle,
                out_dir=out,
                connect=connect,
                settings=settings,
                overwrite=args.force,
                device=device,
                autocast=not args.no_autocast,
                resources={"GPU": 1} if device.startswith("cuda") else None,
                group_by=args.group_by,
                dose_column=args.dose_column,
                arguments=arguments,
                progress=display,
            )
    finally:
        for client, cluster in started:
            client.close()
            if cluster is not None:
                cluster.close()
    console = rich_console()
    counts = result.summary
    console.print(
        f"{counts['total']} images: {counts['done']} done, {counts['reused']} already "
        f"finished, {counts['failed']} failed",
        markup=False,
    )
    for image in result.failed:
        console.print(f"  failed {image.path}: {image.error}", markup=False)
    no_pixel_size = _without_pixel_size(result.table)
    if no_pixel_size:
        console.print(
            f"warning: {no_pixel_size} image(s) have no pixel size and are measured in pixels "
            "only (table column 'warning'); give --mpp or an mpp manifest column",
            markup=False,
        )
    table = result.table or "none (no image finished)"
    console.print(f"table {table}; run record {result.metadata}", markup=False)
    if result.plots:
        console.print("plots " + ", ".join(str(p) for p in result.plots.values()), markup=False)
    return EXIT_ERROR if result.failed else EXIT_OK


def _without_pixel_size(table: Path | None) -> int:
    """Images of the cohort table measured in pixels only."""
    import csv

    if table is None:
        return 0
    with table.open(newline="", encoding="utf-8") as fh:
        return len({r["image"] for r in csv.DictReader(fh) if r.get("mpp_source") == "none"})


def _worker_device(name: str, *, local: bool) -> tuple[str, list[int]]:
    """The device the workers use and, for a local CUDA cluster, the GPUs (one worker each).

    With ``--scheduler`` the workers may have GPUs the driver lacks, so only the name is
    checked here; the tasks then ask for the ``GPU`` resource.
    """
    import torch

    device = parse_device(name, allow_auto=False, here=local)
    if device.type == "cpu" or not local:
        return str(device), []
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


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _CohortLog:
    """Progress as plain lines on stdout, flushed (a log file, a pipe, a Slurm log): one at
    the start, then one per finished or failed image with the counts and the time left."""

    def __call__(self, tick: CohortTick) -> None:
        if tick.image is None:
            to_run = tick.total - tick.reused
            print(
                f"cohort: {tick.total} images, {tick.reused} finished earlier, {to_run} to run",
                flush=True,
            )
            return
        image = tick.image
        n = tick.total - tick.remaining
        what = f"{image.status} {image.stem}"
        if image.status == "failed":
            what = f"FAILED {image.stem}: {image.error}"
        elif image.worker:
            what += f" ({image.seconds:.1f} s on {image.worker})"
        eta = tick.eta_s
        left = f"{tick.remaining} left" + (f", ETA {_clock(eta)}" if eta and tick.remaining else "")
        print(
            f"[{n}/{tick.total}] {what}; {tick.done} done, {tick.failed} failed, {left}",
            flush=True,
        )

    def __enter__(self) -> _CohortLog:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _CohortBar:
    """done / failed / remaining with ETA, for ``cohort`` on a terminal."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(), transient=False
        )
        self._task: Any = None

    def __call__(self, tick: CohortTick) -> None:
        text = (
            f"images: {tick.done} done, {tick.reused} finished earlier, {tick.failed} failed, "
            f"{tick.remaining} remaining"
        )
        finished = tick.total - tick.remaining
        if self._task is None:
            self._task = self._progress.add_task(text, total=tick.total)
        self._progress.update(self._task, completed=finished, description=text)

    def __enter__(self) -> _CohortBar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
