"""A model over a cohort of slides and plates on Dask distributed: resumable, failure-isolated.

One task per image (per field for plates) runs :func:`simsearch_wsi.infer.predict.predict_target`
on a Dask worker, writing the image's outputs at fixed paths in the output folder and its
``<stem>.predict.json`` completion record last. The model bundle is scattered to every worker
once (``broadcast``) and each worker process builds its :class:`PatchModel` once per model. A
failing image is recorded with its error and does not stop the others. A re-run skips every
image whose completion record matches the model and settings, and redoes the rest.

Everything a task carries is decided on the client: absolute input paths (a manifest's relative
paths are taken from the manifest's folder), the absolute output folder, each image's output
stem and pixel size. Before any task is submitted the client checks, once per input (a plate:
one of its fields), that the model suits the image's channels, and that the workers see the
inputs and the output folder under the same paths; images finished by an earlier run are
recognised on the client, so a run with nothing left to do never needs a worker.

Tasks that need a GPU ask for a Dask *resource* (``resources={"GPU": 1}``), so they land only
on workers started with that resource (``dask worker ... --resources GPU=1``) and at most one
runs per GPU at a time.

The caller owns the Dask client (a ``LocalCluster`` of worker processes, or any scheduler
address), the device and the progress display; this module never creates one.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import platform
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from simsearch_wsi.core.atomic import remove_leftovers, write_json_atomic
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.tables import csv_errors
from simsearch_wsi.infer.dense import PatchModel, bundle_digest, check_model_fits
from simsearch_wsi.infer.predict import (
    PredictSettings,
    PredictTarget,
    expand_inputs,
    finished_result,
    predict_target,
    refuse_overwriting_inputs,
    table_rows,
)
from simsearch_wsi.io.selection import image_stem
from simsearch_wsi.train.bundle import ModelBundle

__all__ = [
    "PIXEL_COLUMNS",
    "CohortEntry",
    "CohortImage",
    "CohortResult",
    "CohortTick",
    "check_resources",
    "check_workers_see",
    "cohort_targets",
    "read_manifest",
    "run_cohort",
]

#: table columns every cohort image gets after its metadata: the level-0 pixel size used
#: (um/px, empty when unknown), where it came from (``file``, ``manifest``, ``--mpp`` or
#: ``none``) and a warning for an image measured in pixels only
PIXEL_COLUMNS = ("mpp", "mpp_source", "warning")
NO_PIXEL_SIZE = (
    "no pixel size: measured in pixels only (area_um2 and density_per_mm2 empty); give --mpp "
    "or an mpp manifest column"
)


@dataclass(frozen=True)
class CohortEntry:
    """One manifest row: an image (or plate) path, its metadata columns, and optionally the
    name its outputs get (``id`` column) and its level-0 pixel size in um/px (``mpp`` column,
    which replaces the file's)."""

    path: str
    metadata: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    mpp: float | None = None


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


@dataclass(frozen=True)
class CohortTick:
    """Where a run stands, for a progress display: once after the client's checks (``image``
    None; ``reused`` counts the images earlier runs finished) and after each image a worker
    finished or failed (``image``). ``elapsed_s``: seconds since the first task was submitted."""

    image: CohortImage | None
    done: int
    reused: int
    failed: int
    total: int
    elapsed_s: float = 0.0

    @property
    def remaining(self) -> int:
        return self.total - self.done - self.reused - self.failed

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the pace of the images computed so far (failures, often quick,
        left out); None before the first."""
        if self.done == 0:
            return None
        return self.elapsed_s / self.done * self.remaining


#: progress callback of a cohort run
CohortProgress = Callable[[CohortTick], None]


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


def _name_problem(name: str) -> str | None:
    """Why ``name`` cannot name output files (None when it can)."""
    if name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\:"):
        return "an output name must not start with '.' or contain '/', '\\' or ':'"
    return None


def read_manifest(path: str | Path, *, cohort: bool = False) -> list[CohortEntry]:
    """Rows of a CSV manifest: a ``path`` column (relative paths are taken from the manifest's
    folder) and any metadata columns (patient, stain, plate, dose, ...), kept as text.

    With ``cohort`` (how ``cohort`` reads it), every path is returned absolute and two
    columns are settings of their image, checked here: ``id`` names its outputs (kept as
    metadata too; an empty cell: named after the path) and ``mpp`` is its level-0 pixel size
    in um/px (empty: the file's; not kept as metadata); the names of the cohort table's own
    columns (:data:`PIXEL_COLUMNS`) are refused. Without it (``quantify``), the rows as
    they are.
    """
    where = Path(path)
    if not where.is_file():
        raise ConfigError(f"{where}: manifest not found; give a CSV file with a 'path' column")
    folder = where.absolute().parent
    with csv_errors(where, "manifest"), where.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        if "path" not in columns:
            raise ConfigError(
                f"{where}: the manifest has no 'path' column (columns: {columns}); add one "
                "with the image paths"
            )
        reserved = [c for c in PIXEL_COLUMNS[1:] if c in columns]
        if cohort and reserved:
            raise ConfigError(
                f"{where}: the manifest columns {reserved} are names the cohort table gives "
                "its own columns; rename them"
            )
        entries = []
        for n, row in enumerate(reader, start=2):
            text = (row.get("path") or "").strip()
            if not text:
                raise ConfigError(f"{where}, line {n}: empty path; fill it in or drop the row")
            if "\x00" in text:
                raise ConfigError(f"{where}, line {n}: the path contains a NUL character")
            p = Path(text)
            meta = {k: (v or "") for k, v in row.items() if k != "path" and k is not None}
            if not cohort:
                entries.append(CohortEntry(str(p if p.is_absolute() else where.parent / p), meta))
                continue
            absolute = os.path.normpath(p if p.is_absolute() else folder / p)
            mpp = _parse_mpp(meta.pop("mpp", ""), where=f"{where}, line {n}")
            name = meta.get("id", "").strip() or None
            problem = _name_problem(name) if name else None
            if problem:
                raise ConfigError(f"{where}, line {n}: id {name!r}: {problem}")
            entries.append(CohortEntry(absolute, meta, name=name, mpp=mpp))
    if not entries:
        raise ConfigError(f"{where}: the manifest lists no images")
    return entries


def _parse_mpp(text: str, *, where: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise ConfigError(
            f"{where}: mpp {text!r} is not a pixel size; give um/px (> 0) or leave it empty"
        )
    return value


def _well_key(name: str) -> tuple[str, int] | str:
    """``B2``, ``b02`` and ``B/2`` name the same well."""
    text = name.strip().replace("/", "").upper()
    letters = text.rstrip("0123456789")
    digits = text[len(letters) :]
    return (letters, int(digits)) if letters.isalpha() and digits else text


def cohort_targets(
    entries: Sequence[CohortEntry], *, mpp: float | None = None
) -> list[PredictTarget]:
    """The images of a cohort (plates expanded to fields), each with an absolute path, a
    unique output stem and its manifest metadata before its plate columns, then
    :data:`PIXEL_COLUMNS` (filled in from the image files by :func:`run_cohort`).

    Output stems: an entry's ``name`` (manifest ``id``), else its file name's stem or, when
    two images would then share one (``b1/slide.tiff``, ``b2/slide.tiff``), for every image
    its path relative to the common folder of all inputs with ``_`` for ``/``
    (``b1_slide``); a plate field adds ``_<well>_f<field>``. Pixel size:
    the entry's ``mpp``, else ``mpp`` (``--mpp``), else the file's.

    A manifest row with a ``well`` value (``B2``) is a plate map row: its metadata (compound,
    dose, ...) goes to that well's fields only, and a plate listed by wells runs only the wells
    listed. Missing paths are kept (they fail as images, not the run). Raises
    :class:`ConfigError` for clashing output stems, a ``well`` on an image that is not a
    plate, a well the plate lacks, or metadata columns named like the plate columns.
    """
    from simsearch_wsi.io.plate import is_plate

    targets: list[PredictTarget] = []
    names: list[str | None] = []
    expanded: dict[str, list[PredictTarget]] = {}
    for entry in entries:
        path = os.path.abspath(entry.path)
        meta = dict(entry.metadata)
        well = meta.pop("well", "").strip()
        if entry.name is not None and _name_problem(entry.name):
            raise ConfigError(f"{path}: output name {entry.name!r}: {_name_problem(entry.name)}")
        size = entry.mpp if entry.mpp is not None else mpp
        source = "manifest" if entry.mpp is not None else "--mpp" if mpp is not None else ""
        pixel = {"mpp": "" if size is None else size, "mpp_source": source, "warning": ""}
        if not Path(path).exists():
            found = [PredictTarget(path, image_stem(path), {**meta, **pixel}, mpp=size)]
        else:
            if well and not is_plate(path):
                raise ConfigError(
                    f"{path}: the manifest names well {well} but this is not an OME-Zarr "
                    "plate; leave its well cell empty"
                )
            if path not in expanded:
                expanded[path] = expand_inputs([path])
            fields = expanded[path]
            if well:
                fields = [t for t in fields if _well_key(str(t.extra["well"])) == _well_key(well)]
                if not fields:
                    wells = sorted({str(t.extra["well"]) for t in expanded[path]})
                    raise ConfigError(
                        f"{path}: the manifest names well {well}, which this plate does not "
                        f"have (wells: {', '.join(wells)}); correct the well column"
                    )
            found = []
            for t in fields:
                clash = sorted(set(meta) & set(t.extra))
                if clash:
                    raise ConfigError(
                        f"manifest columns {clash} clash with the plate columns of {path}; "
                        "rename them"
                    )
                found.append(dataclasses.replace(t, extra={**meta, **t.extra, **pixel}, mpp=size))
        targets.extend(found)
        names.extend([entry.name] * len(found))
    targets = _name_outputs(targets, names)
    seen: dict[str, str] = {}
    for t in targets:
        key = t.stem.casefold()  # one file on case-insensitive file systems
        if key in seen:
            raise ConfigError(
                f"{t.path} and {seen[key]} would both write {t.stem}.*; give the manifest "
                "an 'id' column with a unique name for each image"
            )
        seen[key] = t.path
    return targets


def _name_outputs(
    targets: Sequence[PredictTarget], names: Sequence[str | None]
) -> list[PredictTarget]:
    """Output stems (:func:`cohort_targets`): ``names`` where given; the others keep their
    file's stem when all stems are then unique, else all are named from their path relative
    to the inputs' common folder."""
    named_after = [t.plate or t.path for t in targets]  # a plate field: its plate
    folders = [os.path.dirname(p) for p in named_after]
    root = os.path.commonpath(folders) if folders else ""

    def stems(qualified: bool) -> list[str]:
        out = []
        for t, name, image, folder in zip(targets, names, named_after, folders, strict=True):
            base = image_stem(image)
            if name is None and qualified:
                rel = os.path.relpath(folder, root)
                name = "_".join([*([] if rel == "." else Path(rel).parts), base])
            prefix = base if name is None else name
            out.append(prefix + t.stem[len(base) :] if t.stem.startswith(base) else t.stem)
        return out

    chosen = stems(False)
    # casefolded: on macOS and Windows file systems Slide.* and slide.* are the same files
    if len({c.casefold() for c in chosen}) < len(chosen):
        chosen = stems(True)
    return [dataclasses.replace(t, stem=s) for t, s in zip(targets, chosen, strict=True)]


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


def _prepare(targets: Sequence[PredictTarget], bundle: ModelBundle) -> list[PredictTarget]:
    """``targets`` with their pixel-size columns filled in from the image files, after
    checking once per input (a plate: its first field listed) that ``bundle`` suits it.

    Reads metadata only. An input that cannot be opened is left for its tasks to fail (and
    be recorded); inputs the model does not suit raise one :class:`ConfigError` naming them.
    """
    from simsearch_wsi.io import open_image

    seen: dict[str, tuple[bool, float | None]] = {}  # input -> (opened, its mpp)
    misfits: list[str] = []
    for t in targets:
        key = t.plate or t.path
        if key in seen:
            continue
        try:
            image = open_image(t.path, mpp=t.mpp)
        except Exception:  # missing, corrupt, ...: recorded as the image's failure
            seen[key] = (False, None)
            continue
        with image:
            seen[key] = (True, image.mpp)
            try:
                check_model_fits(bundle, image)
            except ConfigError as exc:
                reason = str(exc).removeprefix(f"{image.path}: ")
                misfits.append(f"{key}: {reason}")
    if misfits:
        more = f" (and {len(misfits) - 1} more input(s) alike)" if len(misfits) > 1 else ""
        raise ConfigError(
            f"the model does not suit {len(misfits)} input(s), so nothing was run: "
            f"{misfits[0]}{more}"
        )
    out = []
    for t in targets:
        opened, mpp = seen[t.plate or t.path]
        if t.extra.get("mpp_source") or not opened:
            out.append(t)
            continue
        pixel = (
            {"mpp": mpp, "mpp_source": "file", "warning": ""}
            if mpp is not None
            else {"mpp": "", "mpp_source": "none", "warning": NO_PIXEL_SIZE}
        )
        out.append(dataclasses.replace(t, extra={**t.extra, **pixel}))
    return out


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
            open_image=lambda p: open_image(p, mpp=target.mpp),
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


def _worker_sees(paths: Sequence[str], out_dir: str, marker: str) -> list[str]:
    """Run on each worker: what of the client's inputs and output folder it does not see."""
    problems = []
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        problems.append(f"{len(missing)} of {len(paths)} inputs not found, e.g. {missing[0]}")
    if not os.path.exists(os.path.join(out_dir, marker)):
        problems.append(f"the output folder {out_dir} is missing or not the client's")
    elif not os.access(out_dir, os.W_OK):
        problems.append(f"the output folder {out_dir} is not writable")
    return problems


def check_workers_see(
    client: Any, paths: Sequence[str], out_dir: Path, *, timeout_s: float = 60.0
) -> None:
    """Raise :class:`ConfigError` unless every worker of ``client`` sees ``paths`` (inputs
    the client sees) and the folder ``out_dir`` (which must exist) as the client does: a
    marker file the client writes there, checked by a small task on each worker. Waits up to
    ``timeout_s`` for a first worker to connect."""
    try:
        client.wait_for_workers(1, timeout=timeout_s)
    except TimeoutError:
        raise ConfigError(
            f"no Dask worker connected to the scheduler within {timeout_s:g} s; start workers "
            "('dask worker SCHEDULER_ADDRESS')"
        ) from None
    marker = f".simsearch-probe-{uuid.uuid4().hex}"
    probe = out_dir / marker
    probe.write_bytes(b"")
    try:
        seen = client.run(_worker_sees, list(paths), str(out_dir), marker)
    finally:
        probe.unlink(missing_ok=True)
    blind = sorted((w, p) for w, p in seen.items() if p)
    if blind:
        worker, problems = blind[0]
        raise ConfigError(
            f"{len(blind)} of {len(seen)} Dask workers do not see the inputs or the output "
            f"folder as this client does (worker {worker}: {'; '.join(problems)}); the "
            "workers need the same paths, e.g. a shared file system"
        )


def run_cohort(
    targets: Sequence[PredictTarget],
    bundle: ModelBundle,
    *,
    out_dir: Path,
    client: Any = None,
    connect: Callable[[], Any] | None = None,
    settings: PredictSettings | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    autocast: bool = True,
    resources: Mapping[str, float] | None = None,
    group_by: str | None = None,
    dose_column: str | None = None,
    arguments: dict[str, Any] | None = None,
    progress: CohortProgress | None = None,
    worker_timeout_s: float = 60.0,
) -> CohortResult:
    """Run ``bundle`` over ``targets`` on the Dask ``client``'s workers.

    Writes per image what ``predict`` writes, then ``quantification.csv`` (the rows of every
    image finished in ``out_dir`` with this model and settings, with its manifest metadata)
    and ``run_metadata.json`` (versions, arguments, model digest, start and end times,
    per-image status, worker and error), all into ``out_dir`` (made absolute here).
    ``overwrite`` redoes images finished before. Images an earlier run finished are found on
    this side; when none is left, no client is needed: ``connect`` (called only when there
    is work, instead of passing ``client``) returns one. ``resources`` (e.g. ``{"GPU": 1}``
    with a CUDA ``device``) is what each task asks of a worker. Then the plots of
    :func:`~simsearch_wsi.cohort.plots.write_cohort_plots`, images grouped by the manifest
    column ``group_by`` and, with a dose column, a dose response (both found by default when
    the manifest has a suitable column). ``progress`` gets a :class:`CohortTick` at the start
    and after each image.

    Raises :class:`ConfigError` before any task when an output would replace an input, when
    ``group_by``/``dose_column`` is not a manifest column, when the model does not suit an
    input (:func:`_prepare`), when no worker offers ``resources``, or when the workers do not
    see the inputs or the output folder (:func:`check_workers_see`).
    """
    from simsearch_wsi.cohort.plots import write_cohort_plots
    from simsearch_wsi.infer.quantify import write_table

    settings = settings or PredictSettings()
    out_dir = Path(os.path.abspath(out_dir))
    targets = list(targets)
    refuse_overwriting_inputs(
        targets,
        out_dir,
        inputs=[("model", bundle.source)] if bundle.source is not None else [],
        outputs=cohort_outputs(targets),
    )
    _check_columns(targets, group_by=group_by, dose_column=dose_column)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    digest = bundle_digest(bundle)
    images: list[CohortImage | None] = [None] * len(targets)
    pending: list[int] = []
    for n, t in enumerate(targets):
        previous = (
            None if overwrite else finished_result(t, digest, out_dir=out_dir, settings=settings)
        )
        if previous is None:
            pending.append(n)
        else:
            images[n] = CohortImage(
                t.path,
                t.stem,
                "reused",
                outputs=dict(previous.outputs),
                n_detections=dict(previous.n_detections),
            )
    for n, t in zip(pending, _prepare([targets[n] for n in pending], bundle), strict=True):
        targets[n] = t
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("quantification.csv", "run_metadata.json"):
        remove_leftovers(out_dir / name)  # of a killed earlier run
    counts = {"done": 0, "reused": len(targets) - len(pending), "failed": 0}
    if progress is not None:
        progress(CohortTick(None, total=len(targets), **counts))
    if pending:
        from distributed import as_completed  # only when there is work

        if client is None:
            if connect is None:
                raise ValueError("run_cohort needs a client (or connect) when images are left")
            client = connect()
        inputs = dict.fromkeys(targets[n].plate or targets[n].path for n in pending)
        check_workers_see(
            client,
            [p for p in inputs if os.path.exists(p)],
            out_dir,
            timeout_s=worker_timeout_s,
        )
        if resources:
            check_resources(client, resources)
        shipped = client.scatter(bundle, broadcast=True)
        t0 = time.perf_counter()
        futures = {
            client.submit(
                _run_one,
                shipped,
                targets[n],
                str(out_dir),
                settings,
                not overwrite,
                device,
                autocast,
                pure=False,
                resources=dict(resources) if resources else None,
            ): n
            for n in pending
        }
        for future in as_completed(futures):  # type: ignore[no-untyped-call]
            n = futures[future]
            try:
                image = CohortImage(**future.result())
            except Exception as exc:  # the worker itself died: the task is lost, not the run
                t = targets[n]
                image = CohortImage(t.path, t.stem, "failed", error=_first_line(exc))
            images[n] = image
            counts[image.status] += 1
            if progress is not None:
                elapsed = time.perf_counter() - t0
                progress(CohortTick(image, total=len(targets), elapsed_s=elapsed, **counts))
    finished = [i for i in images if i is not None]
    # every image finished in this folder with this model and settings (this run's included)
    rows = table_rows(
        out_dir, digest, settings=settings, results=[], stems={t.path: t.stem for t in targets}
    )
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
            "out": str(out_dir),
            "model": {"digest": digest, "source": str(bundle.source)},
            "settings": settings.to_dict(),
            "table": str(table) if table else None,
            "plots": {k: str(v) for k, v in plots.items()},
            "images": [i.to_dict() for i in finished],
            "summary": _summary(finished),
        },
    )
    return CohortResult(finished, table, metadata, plots)
