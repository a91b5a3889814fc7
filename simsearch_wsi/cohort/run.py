"""A model over a cohort of slides and plates on Dask distributed: resumable, failure-isolated.

One task per image (per field for plates) runs :func:`simsearch_wsi.infer.predict.predict_target`
on a Dask worker, writing the image's outputs at fixed paths in the output folder and its
``<stem>.predict.json`` completion record last. The model bundle is scattered to every worker
once (``broadcast``) and each worker process builds its :class:`PatchModel` once per model. A
failing image is recorded with its error and does not stop the others. A re-run skips every
image whose completion record matches the model and settings, and redoes the rest.

Tasks that need a GPU ask for a Dask *resource* (``resources={"GPU": 1}``), so they land only
on workers started with that resource (``dask worker ... --resources GPU=1``) and at most one
runs per GPU at a time.

The caller owns the Dask client (a ``LocalCluster`` of worker processes, or any scheduler
address), the device and the progress display; this module never creates one.
"""

from __future__ import annotations

import csv
import dataclasses
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from simsearch_wsi.core.atomic import remove_leftovers, write_json_atomic
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.tables import csv_errors
from simsearch_wsi.infer.dense import PatchModel, bundle_digest
from simsearch_wsi.infer.predict import (
    PredictSettings,
    PredictTarget,
    check_unique_stems,
    expand_inputs,
    predict_target,
    refuse_overwriting_inputs,
    table_rows,
)
from simsearch_wsi.io.selection import image_stem
from simsearch_wsi.train.bundle import ModelBundle

__all__ = [
    "CohortEntry",
    "CohortImage",
    "CohortResult",
    "check_resources",
    "cohort_targets",
    "read_manifest",
    "run_cohort",
]

#: progress callback of a cohort run: (done, failed, total)
CohortProgress = Callable[[int, int, int], None]


@dataclass(frozen=True)
class CohortEntry:
    """One manifest row: an image (or plate) path and its metadata columns."""

    path: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class CohortImage:
    """What happened to one image: ``done``, ``reused`` (finished by an earlier run) or
    ``failed`` (with ``error``, one line), and on which Dask worker."""

    path: str
    stem: str
    status: str
    error: str | None = None
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    n_detections: dict[str, int] = field(default_factory=dict)
    worker: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CohortResult:
    """Per-image outcomes; the cohort table (None when no image has rows yet), the run
    record, and the plots written (name -> PNG or CSV path)."""

    images: list[CohortImage]
    table: Path | None
    metadata: Path
    plots: dict[str, Path] = field(default_factory=dict)

    @property
    def failed(self) -> list[CohortImage]:
        return [i for i in self.images if i.status == "failed"]

    @property
    def summary(self) -> dict[str, int]:
        """Images in all, and by status."""
        return _summary(self.images)


#: Files a cohort run writes into its folder besides each image's (and its plates' plots,
#: :func:`cohort_outputs`).
COHORT_OUTPUTS = ("run_metadata.json", "fractions.png", "wells.csv", "dose_response.png")


def cohort_outputs(targets: Sequence[PredictTarget]) -> tuple[str, ...]:
    """Names of every file a cohort run of ``targets`` writes into its folder besides each
    image's: :data:`COHORT_OUTPUTS` and one ``plate_<name>.png`` per plate."""
    from simsearch_wsi.cohort.plots import plate_plot_files

    plates = [str(t.extra["plate"]) for t in targets if t.plate and "plate" in t.extra]
    return (*COHORT_OUTPUTS, *plate_plot_files(plates))


def _summary(images: Sequence[CohortImage]) -> dict[str, int]:
    counts = {s: sum(i.status == s for i in images) for s in ("done", "reused", "failed")}
    return {"total": len(images), **counts}


def read_manifest(path: str | Path) -> list[CohortEntry]:
    """Rows of a CSV manifest: a ``path`` column (relative paths are taken from the manifest's
    folder) and any metadata columns (patient, stain, plate, dose, ...), kept as text."""
    where = Path(path)
    if not where.is_file():
        raise ConfigError(f"{where}: manifest not found; give a CSV file with a 'path' column")
    with csv_errors(where, "manifest"), where.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        if "path" not in columns:
            raise ConfigError(
                f"{where}: the manifest has no 'path' column (columns: {columns}); add one "
                "with the image paths"
            )
        entries = []
        for n, row in enumerate(reader, start=2):
            text = (row.get("path") or "").strip()
            if not text:
                raise ConfigError(f"{where}, line {n}: empty path; fill it in or drop the row")
            if "\x00" in text:
                raise ConfigError(f"{where}, line {n}: the path contains a NUL character")
            p = Path(text)
            p = p if p.is_absolute() else where.parent / p
            meta = {k: (v or "") for k, v in row.items() if k != "path" and k is not None}
            entries.append(CohortEntry(str(p), meta))
    if not entries:
        raise ConfigError(f"{where}: the manifest lists no images")
    return entries


def _well_key(name: str) -> tuple[str, int] | str:
    """``B2``, ``b02`` and ``B/2`` name the same well."""
    text = name.strip().replace("/", "").upper()
    letters = text.rstrip("0123456789")
    digits = text[len(letters) :]
    return (letters, int(digits)) if letters.isalpha() and digits else text


def cohort_targets(entries: Sequence[CohortEntry]) -> list[PredictTarget]:
    """The images of a cohort (plates expanded to fields), each with its manifest metadata
    before its plate columns.

    A manifest row with a ``well`` value (``B2``) is a plate map row: its metadata (compound,
    dose, ...) goes to that well's fields only, and a plate listed by wells runs only the wells
    listed. Missing paths are kept (they fail as images, not the run). Raises
    :class:`ConfigError` for clashing output stems, a ``well`` on an image that is not a
    plate, a well the plate lacks, or metadata columns named like the plate columns.
    """
    from simsearch_wsi.io.plate import is_plate

    targets: list[PredictTarget] = []
    expanded: dict[str, list[PredictTarget]] = {}
    for entry in entries:
        meta = dict(entry.metadata)
        well = meta.pop("well", "").strip()
        if not Path(entry.path).exists():
            targets.append(PredictTarget(entry.path, image_stem(entry.path), meta))
            continue
        if well and not is_plate(entry.path):
            raise ConfigError(
                f"{entry.path}: the manifest names well {well} but this is not an OME-Zarr "
                "plate; leave its well cell empty"
            )
        if entry.path not in expanded:
            expanded[entry.path] = expand_inputs([entry.path])
        fields = expanded[entry.path]
        if well:
            fields = [t for t in fields if _well_key(str(t.extra["well"])) == _well_key(well)]
            if not fields:
                wells = sorted({str(t.extra["well"]) for t in expanded[entry.path]})
                raise ConfigError(
                    f"{entry.path}: the manifest names well {well}, which this plate does not "
                    f"have (wells: {', '.join(wells)}); correct the well column"
                )
        for t in fields:
            clash = sorted(set(meta) & set(t.extra))
            if clash:
                raise ConfigError(
                    f"manifest columns {clash} clash with the plate columns of {entry.path}; "
                    "rename them"
                )
            targets.append(dataclasses.replace(t, extra={**meta, **t.extra}))
    check_unique_stems(targets)
    return targets


def _check_columns(
    targets: Sequence[PredictTarget], *, group_by: str | None, dose_column: str | None
) -> None:
    """``group_by`` and ``dose_column`` must be manifest columns (checked before any work)."""
    columns = list(dict.fromkeys(k for t in targets for k in t.extra))
    for option, name in (("--group-by", group_by), ("--dose-column", dose_column)):
        if name is not None and name not in columns:
            raise ConfigError(
                f"{option} {name}: not a column of the manifest (columns: "
                f"{', '.join(columns) or 'none'}); name one of them"
            )


# one PatchModel per worker process and model (the bundle arrives once per worker by broadcast)
_WORKER_MODELS: dict[str, PatchModel] = {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _run_one(
    bundle: ModelBundle,
    target: PredictTarget,
    out_dir: str,
    settings: PredictSettings,
    resume: bool,
    device: str,
    autocast: bool,
) -> dict[str, Any]:
    """A worker task: one image's outputs, or its error (never raises)."""
    from distributed import get_worker

    from simsearch_wsi.io import open_image

    t0 = time.perf_counter()
    try:
        worker: str | None = str(get_worker().address)
    except ValueError:  # run outside a worker (tests calling it directly)
        worker = None
    try:
        key = f"{id(bundle)}:{device}:{autocast}"
        model = _WORKER_MODELS.get(key)
        if model is None:
            model = PatchModel(bundle, device=device, autocast=autocast)
            _WORKER_MODELS.clear()  # one model at a time per worker
            _WORKER_MODELS[key] = model
        result = predict_target(
            target,
            model,
            out_dir=Path(out_dir),
            open_image=open_image,
            settings=settings,
            resume=resume,
        )
    except Exception as exc:  # isolated: recorded, the other images go on
        return CohortImage(
            target.path,
            target.stem,
            "failed",
            error=_first_line(exc),
            seconds=time.perf_counter() - t0,
            worker=worker,
        ).to_dict()
    return CohortImage(
        target.path,
        target.stem,
        "reused" if result.reused else "done",
        seconds=time.perf_counter() - t0,
        outputs=dict(result.outputs),
        n_detections=dict(result.n_detections),
        worker=worker,
    ).to_dict()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("simsearch_wsi", "torch", "torchvision", "numpy", "dask", "distributed"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def check_resources(client: Any, resources: Mapping[str, float]) -> None:
    """Raise :class:`ConfigError` unless some worker of ``client`` offers ``resources`` (a
    task asking for resources no worker has would wait forever)."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    for info in workers.values():
        offered = info.get("resources") or {}
        if all(offered.get(k, 0) >= v for k, v in resources.items()):
            return
    wanted = " ".join(f"{k}={v:g}" for k, v in resources.items())
    raise ConfigError(
        f"no Dask worker offers the resources {wanted} that these tasks need "
        f"({len(workers)} workers connected); start the GPU workers with "
        f"'dask worker SCHEDULER --resources \"{wanted}\"'"
    )


def run_cohort(
    targets: Sequence[PredictTarget],
    bundle: ModelBundle,
    *,
    out_dir: Path,
    client: Any,
    settings: PredictSettings | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    autocast: bool = True,
    resources: Mapping[str, float] | None = None,
    group_by: str | None = None,
    dose_column: str | None = None,
    arguments: dict[str, Any] | None = None,
    progress: CohortProgress | None = None,
) -> CohortResult:
    """Run ``bundle`` over ``targets`` on the Dask ``client``'s workers.

    Writes per image what ``predict`` writes, then ``quantification.csv`` (the rows of every
    image finished in ``out_dir`` with this model and settings, with its manifest metadata)
    and ``run_metadata.json`` (versions, arguments, model digest, start and end times,
    per-image status, worker and error). ``overwrite`` redoes images finished before.
    ``resources`` (e.g. ``{"GPU": 1}`` with a CUDA ``device``) is what each task asks of a
    worker. Then the plots of :func:`~simsearch_wsi.cohort.plots.write_cohort_plots`, images
    grouped by the manifest column ``group_by`` and, with a dose column, a dose response
    (both found by default when the manifest has a suitable column).
    Raises :class:`ConfigError` before any work when an output would replace an input, when
    no worker offers ``resources``, or when ``group_by``/``dose_column`` is not a manifest column.
    """
    from distributed import as_completed

    from simsearch_wsi.cohort.plots import write_cohort_plots
    from simsearch_wsi.infer.quantify import write_table

    settings = settings or PredictSettings()
    refuse_overwriting_inputs(
        targets,
        out_dir,
        inputs=[("model", bundle.source)] if bundle.source is not None else [],
        outputs=cohort_outputs(targets),
    )
    _check_columns(targets, group_by=group_by, dose_column=dose_column)
    if resources:
        check_resources(client, resources)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("quantification.csv", "run_metadata.json"):
        remove_leftovers(out_dir / name)  # of a killed earlier run
    started = datetime.now(UTC).isoformat(timespec="seconds")
    digest = bundle_digest(bundle)
    shipped = client.scatter(bundle, broadcast=True)
    futures = {
        client.submit(
            _run_one,
            shipped,
            t,
            str(out_dir),
            settings,
            not overwrite,
            device,
            autocast,
            pure=False,
            resources=dict(resources) if resources else None,
        ): n
        for n, t in enumerate(targets)
    }
    images: list[CohortImage | None] = [None] * len(targets)
    failed = 0
    if progress is not None:
        progress(0, 0, len(targets))
    for done, future in enumerate(as_completed(futures), start=1):  # type: ignore[no-untyped-call]
        n = futures[future]
        try:
            record = future.result()
            image = CohortImage(**record)
        except Exception as exc:  # the worker itself died: the task is lost, not the run
            t = targets[n]
            image = CohortImage(t.path, t.stem, "failed", error=_first_line(exc))
        images[n] = image
        failed += image.status == "failed"
        if progress is not None:
            progress(done, failed, len(targets))
    finished = [i for i in images if i is not None]
    # every image finished in this folder with this model and settings (this run's included)
    rows = table_rows(out_dir, digest, settings=settings, results=[])
    table = write_table(out_dir / "quantification.csv", rows) if rows else None
    plots: dict[str, Path] = {}
    if table is not None:
        colors = {c: (int(r), int(g), int(b)) for c, (r, g, b) in bundle.colors.items()}
        plots = write_cohort_plots(
            table, out_dir, group_by=group_by, dose_column=dose_column, colors=colors
        )
    metadata = write_json_atomic(
        out_dir / "run_metadata.json",
        {
            "started": started,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "versions": _versions(),
            "arguments": arguments or {},
            "model": {"digest": digest, "source": str(bundle.source)},
            "settings": settings.to_dict(),
            "table": str(table) if table else None,
            "plots": {k: str(v) for k, v in plots.items()},
            "images": [i.to_dict() for i in finished],
            "summary": _summary(finished),
        },
    )
    return CohortResult(finished, table, metadata, plots)
