"""Running a model bundle over images and writing what users keep (issue 6).

Per image, with output stem ``<stem>`` (the file name without its image suffix; for a plate
field ``<plate>_<well>_f<field>``), each file written atomically in the output folder:

* ``<stem>.geojson``: QuPath objects: the detections (class-map maxima, every class's
  probability and the detection's ranking ``score`` as measurements) and the segmentation as
  classified annotations (polygons with holes, simplified, small pieces dropped);
* ``<stem>.ome.zarr``: OME-Zarr NGFF 0.4 (Zarr v2, Blosc) with the class probabilities as the
  image and the label mask under ``labels/simsearch`` (``image-label`` colours);
* ``<stem>_overlay.png``: a thumbnail with the classes coloured, for quality control;
* ``<stem>.predict.json``: what was run (model, thresholds, settings), the outputs and the
  table rows; its presence with the same model and settings lets a rerun skip the image;

and for the whole run ``quantification.csv``: one row per image (plates: per well and field,
with plate, well, row, column and field columns) and class: detections, density per mm² of
foreground, area in µm², fraction of the foreground and, for brightfield, the mean DAB optical
density of the class region.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.atomic import atomic_path, remove_leftovers, write_json_atomic
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.pathguard import Named, check_outputs_not_inputs
from simsearch_wsi.features.extractor import ProgressFn
from simsearch_wsi.features.tiling import display_rgb8, read_overview
from simsearch_wsi.features.tissue import TissueMask
from simsearch_wsi.infer.dense import (
    ClassMaps,
    Detection,
    PatchModel,
    Segmentation,
    dense_class_maps,
    detect,
    segment,
)
from simsearch_wsi.io.base import ImageSource
from simsearch_wsi.io.selection import expand_images, image_stem
from simsearch_wsi.qupath.geojson import box_features, set_stable_ids, write_feature_collection

__all__ = [
    "PredictResult",
    "PredictSettings",
    "PredictTarget",
    "detection_features",
    "expand_inputs",
    "finished_result",
    "predict_image",
    "predict_images",
    "segmentation_subdivision",
    "target_identity",
]

#: segmentation grids are kept under this many pixels (the subdivision of a feature cell drops
#: from 4 towards 1 on large slides; at stride 16 and 1 subdivision a 100k x 80k slide is 31 MP)
MAX_SEGMENTATION_PIXELS = 64_000_000
#: brightfield pixels for the DAB measurement are read at about this size
DAB_OVERVIEW_PIXELS = 4_000_000
#: write-back labels are written at the image's full resolution; refused above this size
MAX_WRITE_BACK_PIXELS = 1_000_000_000
LABEL_NAME = "simsearch"
#: what each image gets in the output folder, after its stem
OUTPUT_SUFFIXES = (".geojson", ".ome.zarr", "_overlay.png", ".predict.json")


@dataclass(frozen=True)
class PredictSettings:
    """What a ``predict`` run writes and how.

    ``thresholds`` override the bundle's per-class confidence thresholds; ``simplify_px`` is the
    polygon tolerance in segmentation-grid pixels; segmentation pieces under ``min_area_um2``
    are dropped; ``write_back`` adds the label mask to OME-Zarr *inputs* as ``labels/simsearch``.
    ``object_size_px`` (level-0 px; objects smaller than the model's patch, which may touch):
    detections are spaced and boxed by the object's size
    (:func:`~simsearch_wsi.infer.dense.detect`); segmentation is unchanged.
    """

    thresholds: dict[str, float] = field(default_factory=dict)
    simplify_px: float = 1.0
    min_area_um2: float = 0.0
    tile_size: int = 1024
    batch_size: int = 4
    write_zarr: bool = True
    write_overlay: bool = True
    write_back: bool = False
    object_size_px: float | None = None
    #: ``"foreground"``: run the model over the tiles the foreground mask touches; ``"all"``:
    #: over every tile
    tiles: str = "foreground"

    def __post_init__(self) -> None:
        if self.tiles not in ("foreground", "all"):
            raise ConfigError(f"tiles must be 'foreground' or 'all', got {self.tiles!r}")
        obj = self.object_size_px
        if obj is not None and not (math.isfinite(obj) and obj > 0):
            raise ConfigError(f"object size must be > 0 level-0 pixels, got {obj}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a dict: the identity of a run's outputs (object ids, the completion
        record). Options left at a default that did not exist before (None-valued options
        unset, ``tiles`` "foreground") are left out, so adding one keeps the identity, ids and
        completion records of runs made without it."""
        out = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.default is None and out[f.name] is None:
                del out[f.name]
        if self.tiles == "foreground":
            del out["tiles"]
        return out


@dataclass(frozen=True)
class PredictTarget:
    """One image of a run: where it is, its output stem, its extra table columns (plate,
    well, row, column, field for a plate field), for a plate field the plate folder, and
    ``mpp``, a level-0 pixel size (um/px) given for this image that replaces the file's (part
    of the input's identity, :func:`target_identity`; the caller's ``open_image`` applies it)."""

    path: str
    stem: str
    extra: dict[str, Any] = field(default_factory=dict)
    plate: str | None = None
    mpp: float | None = None


@dataclass
class PredictResult:
    """What :func:`predict_image` wrote for one image (also ``<stem>.predict.json``)."""

    image: str
    stem: str
    outputs: dict[str, str]
    n_detections: dict[str, int]
    rows: list[dict[str, Any]]
    seconds: float
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def expand_inputs(
    paths: Sequence[str],
    *,
    wells: Sequence[str] | None = None,
    fields: Sequence[int] | None = None,
) -> list[PredictTarget]:
    """The images of a run (:func:`simsearch_wsi.io.selection.expand_images`): slides and images
    as given, plate fields given by path named ``<plate>_<well>_f<field>`` with their plate
    columns, OME-Zarr plates as every field of every well, or the ``wells`` and ``fields``
    selected. Raises :class:`ImageNotFoundError` for a missing path and :class:`ConfigError`
    when two images would get the same output stem."""
    targets = [
        PredictTarget(i.path, i.stem, dict(i.extra), i.plate)
        for i in expand_images(paths, wells=wells, fields=fields)
    ]
    check_unique_stems(targets)
    return targets


def check_unique_stems(targets: Sequence[PredictTarget]) -> None:
    """Raise :class:`ConfigError` when two images would write the same output files."""
    seen: dict[str, str] = {}
    for t in targets:
        if t.stem in seen:
            raise ConfigError(
                f"{t.path} and {seen[t.stem]} would both write {t.stem}.*; predict them into "
                "separate --out folders or rename one"
            )
        seen[t.stem] = t.path


def check_thresholds(
    thresholds: Mapping[str, float], classes: Sequence[str], *, option: str = "--threshold"
) -> None:
    """Raise :class:`ConfigError` for a threshold of a class the model does not have, or one
    outside [0, 1]; ``option`` names where the user gave them."""
    unknown = sorted(set(thresholds) - set(classes))
    if unknown:
        raise ConfigError(
            f"{option} for unknown class(es) {unknown}; the model's classes are {list(classes)}"
        )
    for name, value in thresholds.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{option} {name}={value}: give a probability in [0, 1]")


def segmentation_subdivision(maps: ClassMaps, max_pixels: int = MAX_SEGMENTATION_PIXELS) -> int:
    """Mask pixels per feature cell along each axis (1..4) so the mask stays under
    ``max_pixels``."""
    s = maps.geometry.stride
    w_a, h_a = maps.analysis_size
    cells = max(1, -(-w_a // s) * -(-h_a // s))
    for sub in (4, 3, 2):
        if cells * sub * sub <= max_pixels:
            return sub
    return 1


def sample_on_grid(
    mask: NDArray[Any],
    mask_downsample: tuple[float, float],
    *,
    shape: tuple[int, int],
    grid_downsample: tuple[float, float],
) -> NDArray[Any]:
    """Nearest sample of a ``mask`` (h, w) whose pixels cover ``mask_downsample`` (x, y)
    level-0 pixels onto a grid of ``shape`` (H, W) whose pixels cover ``grid_downsample``:
    grid pixel (i, j) takes the mask pixel under its centre (clipped at the edges)."""
    ys = ((np.arange(shape[0]) + 0.5) * grid_downsample[1] / mask_downsample[1]).astype(np.intp)
    xs = ((np.arange(shape[1]) + 0.5) * grid_downsample[0] / mask_downsample[0]).astype(np.intp)
    ys = np.minimum(ys, mask.shape[0] - 1)
    xs = np.minimum(xs, mask.shape[1] - 1)
    out: NDArray[Any] = mask[ys[:, None], xs[None, :]]
    return out


def detection_features(
    detections: Sequence[Detection], colors: dict[str, tuple[int, int, int]]
) -> list[dict[str, Any]]:
    """QuPath detections (rectangles of the model's patch) with ``probability <class>``
    measurements (5 decimals) and ``score``, what the model ranks its detections by
    (:attr:`~simsearch_wsi.infer.dense.Detection.score`: the class's log-odds against the
    background for a search head or their ensemble, against all other classes for the linear
    head; 4 decimals, left out where it is not finite)."""
    boxes = np.array(
        [(d.box.x_l0, d.box.y_l0, d.box.width_l0, d.box.height_l0) for d in detections],
        dtype=np.float64,
    ).reshape(-1, 4)
    return box_features(
        boxes,
        class_names=[d.class_name for d in detections],
        measurements=[
            {
                **{f"probability {c}": round(v, 5) for c, v in d.probabilities.items()},
                **({"score": round(d.score, 4)} if math.isfinite(d.score) else {}),
            }
            for d in detections
        ],
        colors=colors,
    )


def write_overlay(
    path: Path,
    image: ImageSource,
    *,
    seg: Segmentation,
    colors: dict[str, tuple[int, int, int]],
    detections: Sequence[Detection],
    max_pixels: int = 1_000_000,
) -> Path:
    """A PNG thumbnail (about ``max_pixels``) with the segmentation classes blended in (45 %)
    and a 3 x 3 dot of the class colour at each detection centre."""
    from PIL import Image

    thumb, ds_x, ds_y = read_overview(image, max_pixels=max_pixels)
    rgb = display_rgb8(thumb, brightfield=image.is_brightfield)
    lab = sample_on_grid(
        seg.labels, seg.downsample, shape=rgb.shape[:2], grid_downsample=(ds_x, ds_y)
    )
    palette = np.zeros((len(seg.classes) + 1, 3), dtype=np.float32)
    for k, name in enumerate(seg.classes, start=1):
        palette[k] = colors.get(name, (255, 0, 0))
    mixed = rgb.astype(np.float32)
    on = lab > 0
    mixed[on] = 0.55 * mixed[on] + 0.45 * palette[lab[on]]
    out = mixed.astype(np.uint8)
    if detections:
        h, w = out.shape[:2]
        centres = np.array([d.box.center_l0 for d in detections], dtype=np.float64)
        xs = np.clip((centres[:, 0] / ds_x).astype(np.intp), 0, w - 1)
        ys = np.clip((centres[:, 1] / ds_y).astype(np.intp), 0, h - 1)
        cols = np.array([colors.get(d.class_name, (255, 0, 0)) for d in detections], dtype=np.uint8)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                out[np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)] = cols
    with atomic_path(path) as tmp:
        Image.fromarray(out).save(tmp, format="PNG")
    return path


def _quantify(
    image: ImageSource,
    seg: Segmentation,
    foreground: TissueMask | None,
    counts: dict[str, int],
) -> list[Any]:
    """Per-class statistics on the segmentation grid; DAB on a brightfield overview."""
    from simsearch_wsi.infer.quantify import region_stats

    fg = None
    if foreground is not None:
        fg = sample_on_grid(
            np.asarray(foreground.mask),
            (foreground.downsample_x, foreground.downsample_y),
            shape=seg.labels.shape,
            grid_downsample=seg.downsample,
        ).astype(bool)
    stats = region_stats(
        seg.labels,
        classes=seg.classes,
        downsample=seg.downsample,
        mpp=image.mpp,
        foreground=fg,
        detections_per_class=counts,
    )
    if image.is_brightfield and image.n_channels == 3:
        thumb, ds_x, ds_y = read_overview(image, max_pixels=DAB_OVERVIEW_PIXELS)
        lab_small = sample_on_grid(
            seg.labels, seg.downsample, shape=thumb.shape[:2], grid_downsample=(ds_x, ds_y)
        )
        rgb = np.clip(thumb[..., :3], 0, 255).astype(np.uint8)
        dab = region_stats(
            lab_small, classes=seg.classes, downsample=(ds_x, ds_y), mpp=None, rgb=rgb
        )
        stats = [
            dataclasses.replace(s, mean_dab_od=d.mean_dab_od)
            for s, d in zip(stats, dab, strict=True)
        ]
    return stats


def _write_back(image: ImageSource, seg: Segmentation, colors: dict[str, Any]) -> Path:
    """The label mask at the image's full resolution as ``labels/simsearch`` of the input."""
    from simsearch_wsi.io.labels import add_labels_to_ome_zarr

    width, height = image.dimensions
    if width * height > MAX_WRITE_BACK_PIXELS:
        raise ConfigError(
            f"{image.path}: writing labels back at full resolution needs a {width}x{height} "
            "mask; use the separate <stem>.ome.zarr output instead of --write-back"
        )
    full = sample_on_grid(
        seg.labels, seg.downsample, shape=(height, width), grid_downsample=(1.0, 1.0)
    )
    return add_labels_to_ome_zarr(
        image.path, full, classes=seg.classes, colors=colors, name=LABEL_NAME, overwrite=True
    )


def predict_image(
    image: ImageSource,
    model: PatchModel,
    *,
    out_dir: Path,
    stem: str | None = None,
    settings: PredictSettings | None = None,
    extra_columns: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> PredictResult:
    """Dense maps, detections and segmentation of ``image``, with every output written.

    Raises :class:`ConfigError` when the image does not suit the model (channels, size).
    """
    from simsearch_wsi.infer.quantify import stats_rows
    from simsearch_wsi.io.labels import write_label_image
    from simsearch_wsi.qupath.polygons import clip_to_image, mask_to_polygons, polygons_to_features

    settings = settings or PredictSettings()
    t0 = time.perf_counter()
    bundle = model.bundle
    stem = stem or image_stem(image.path)
    thresholds = {**bundle.thresholds, **settings.thresholds}
    maps = dense_class_maps(
        image,
        model,
        tile_size=settings.tile_size,
        batch_size=settings.batch_size,
        tiles=settings.tiles,
        progress=progress,
    )
    obj = settings.object_size_px
    detections = detect(maps, thresholds, object_size_l0=None if obj is None else (obj, obj))
    seg = segment(maps, thresholds, cell_subdivision=segmentation_subdivision(maps))
    colors = {c: tuple(int(v) for v in rgb) for c, rgb in bundle.colors.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, str] = {}

    regions = mask_to_polygons(
        seg.labels,
        downsample=seg.downsample,
        simplify_px=settings.simplify_px,
        min_area_um2=settings.min_area_um2,
        mpp=image.mpp,
    )
    regions = clip_to_image(regions, *image.dimensions)
    features = detection_features(detections, colors)  # type: ignore[arg-type]
    features += polygons_to_features(
        regions,
        classes=seg.classes,
        colors=colors,  # type: ignore[arg-type]
        object_type="annotation",
        mpp=image.mpp,
    )
    # the same model, image and settings write the same file (object ids included)
    set_stable_ids(features, f"{model.identity}|{stem}|{settings.to_dict()}")
    geojson = out_dir / f"{stem}.geojson"
    write_feature_collection(geojson, features)
    outputs["geojson"] = str(geojson)

    if settings.write_zarr:
        store = out_dir / f"{stem}.ome.zarr"
        mpp = image.mpp
        px_um = (seg.downsample[1] * mpp, seg.downsample[0] * mpp) if mpp else None
        write_label_image(
            store,
            seg.labels,
            classes=seg.classes,
            colors=colors,  # type: ignore[arg-type]
            probabilities=np.fmax(seg.probabilities, 0.0, out=seg.probabilities),  # NaN -> 0
            pixel_size_um=px_um,
            name=LABEL_NAME,
            overwrite=True,
        )
        outputs["ome_zarr"] = str(store)
    if settings.write_overlay:
        png = out_dir / f"{stem}_overlay.png"
        write_overlay(
            png,
            image,
            seg=seg,
            colors=colors,  # type: ignore[arg-type]
            detections=detections,
        )
        outputs["overlay"] = str(png)
    if settings.write_back and Path(image.path).is_dir():
        outputs["labels"] = str(_write_back(image, seg, colors))

    counted = Counter(d.class_name for d in detections)
    counts = {c: int(counted.get(c, 0)) for c in seg.classes}
    stats = _quantify(image, seg, maps.foreground, counts)
    rows = stats_rows(str(image.path), stats, extra=extra_columns or {})
    result = PredictResult(
        image=str(image.path),
        stem=stem,
        outputs=outputs,
        n_detections=counts,
        rows=rows,
        seconds=time.perf_counter() - t0,
    )
    return result


def _run_record(model_digest: str, settings: PredictSettings) -> dict[str, Any]:
    """What decides an image's outputs: the model and the settings (for resuming)."""
    return {"model": model_digest, "settings": settings.to_dict()}


def input_identity(path: str | Path) -> dict[str, Any] | None:
    """What identifies an input without reading its pixels: its resolved path with the size
    and modification time of the file or, for an OME-Zarr image (a folder), of its metadata
    documents and those of its full-resolution array. None when the path does not exist.

    Labels written into the image later (``labels/``) do not change it; pixels rewritten in
    place without touching the metadata are not noticed.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return None
    ident: dict[str, Any] = {"path": str(p.resolve())}
    if not p.is_dir():
        return {**ident, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    documents = {}
    for name in (".zattrs", ".zgroup", "zarr.json", "0/.zarray", "0/zarr.json"):
        try:
            doc = (p / name).stat()
        except OSError:
            continue
        documents[name] = [doc.st_size, doc.st_mtime_ns]
    return {**ident, "documents": documents}


def target_identity(target: PredictTarget) -> dict[str, Any] | None:
    """:func:`input_identity` of the target's image, with the pixel size given for it (when
    one is): the same file run at another pixel size is another input."""
    ident = input_identity(target.path)
    if ident is not None and target.mpp is not None:
        ident["mpp"] = float(target.mpp)
    return ident


def finished_result(
    target: PredictTarget, model_digest: str, *, out_dir: Path, settings: PredictSettings
) -> PredictResult | None:
    """The result an earlier run recorded for ``target`` in ``out_dir``
    (``<stem>.predict.json``) with the same model, settings and unchanged input
    (:func:`target_identity`), whose outputs are all present; else None. Reads only the
    record and the input's metadata, never its pixels."""
    source = target_identity(target)
    if source is None:
        return None
    summary = out_dir / f"{target.stem}.predict.json"
    return _reusable(summary, _run_record(model_digest, settings), source)


def _reusable(
    path: Path, record: dict[str, Any], input_id: dict[str, Any] | None = None
) -> PredictResult | None:
    """The result recorded in ``path`` when it was made with ``record`` (model and settings)
    and, when ``input_id`` is given, from the same input; else None."""
    import json

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("run") != record:
        return None
    if input_id is not None and doc.get("input") != input_id:
        return None
    try:
        result = PredictResult(**{**doc["result"], "reused": True})
    except (KeyError, TypeError):
        return None
    if not all(Path(p).exists() for p in result.outputs.values()):
        return None
    return result


def refuse_overwriting_inputs(
    targets: Sequence[PredictTarget],
    out_dir: Path,
    *,
    inputs: Sequence[Named] = (),
    outputs: Sequence[str] = (),
) -> None:
    """Outputs must never replace or land inside an input (e.g. ``x.ome.zarr`` predicted into
    its own folder would be replaced by the output store of the same name), whatever the path
    spelling (:func:`~simsearch_wsi.core.pathguard.check_outputs_not_inputs`).

    ``inputs`` are ``(role, path)`` read besides the images (the model, a manifest);
    ``outputs`` names of further files the run writes into ``out_dir`` (besides each image's
    outputs and ``quantification.csv``). Writing labels into an OME-Zarr input (``write_back``)
    is not an output in this sense. Raises
    :class:`~simsearch_wsi.core.errors.OutputOverwritesInputError` (a ``ConfigError``).
    """
    written = [
        ("output", out_dir / f"{t.stem}{suffix}") for t in targets for suffix in OUTPUT_SUFFIXES
    ]
    written += [("output", out_dir / name) for name in ("quantification.csv", *outputs)]
    read: list[Named] = [("plate", t.plate) if t.plate else ("image", t.path) for t in targets]
    check_outputs_not_inputs(written, [*dict.fromkeys(read), *inputs], into=[("--out", out_dir)])


def table_rows(
    out_dir: Path,
    model_digest: str,
    *,
    settings: PredictSettings,
    results: Sequence[PredictResult],
    stems: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Rows of this run's images, then those of earlier runs into the same folder with the same
    model (:func:`~simsearch_wsi.infer.dense.bundle_digest`) and settings (so image-by-image runs,
    e.g. from QuPath, build one cohort table).

    ``stems`` maps this run's input paths to their output stems: an earlier record of one of
    these inputs under another stem (a run that named it differently, e.g. before a second
    ``slide.tiff`` joined the cohort) is left out, so no image is counted twice.
    """
    record = _run_record(model_digest, settings)
    rows = [r for res in results for r in res.rows]
    done = {res.stem for res in results}
    named = {os.path.realpath(p): s for p, s in (stems or {}).items()}
    for path in sorted(out_dir.glob("*.predict.json")):
        stem = path.name[: -len(".predict.json")]
        if stem in done:
            continue
        previous = _reusable(path, record)
        if previous is None or previous.stem != stem:
            continue
        if named.get(os.path.realpath(previous.image), stem) != stem:
            continue  # this run names that input otherwise
        rows.extend(previous.rows)
    return rows


def predict_target(
    target: PredictTarget,
    model: PatchModel,
    *,
    out_dir: Path,
    open_image: Callable[[str], ImageSource],
    settings: PredictSettings,
    resume: bool = True,
    progress: ProgressFn | None = None,
) -> PredictResult:
    """One image of a run: its outputs and ``<stem>.predict.json`` (the completion record,
    written last: the model digest, the settings and the input's identity), or, with
    ``resume``, the result recorded there by an earlier run with the same model, settings and
    unchanged input (:func:`input_identity`) whose outputs are all present.

    Before (re)computing an image, what a killed earlier run left of its outputs (temporaries
    of the atomic writes) is removed; the image's outputs must have no other writer.
    """
    out_dir = out_dir.absolute()  # the record's output paths, wherever the command ran
    record = _run_record(model.identity, settings)
    summary = out_dir / f"{target.stem}.predict.json"
    source = target_identity(target)
    previous = _reusable(summary, record, source) if resume and source is not None else None
    if previous is not None:
        return previous
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix in OUTPUT_SUFFIXES:
        remove_leftovers(out_dir / f"{target.stem}{suffix}")
    with open_image(target.path) as image:
        result = predict_image(
            image,
            model,
            out_dir=out_dir,
            stem=target.stem,
            settings=settings,
            extra_columns=target.extra,
            progress=progress,
        )
    result.outputs["summary"] = str(summary)
    kept = {k: v for k, v in result.to_dict().items() if k != "reused"}
    write_json_atomic(summary, {"run": record, "input": source, "result": kept})
    return result


def predict_images(
    targets: Sequence[PredictTarget],
    model: PatchModel,
    *,
    out_dir: Path,
    open_image: Callable[[str], ImageSource],
    settings: PredictSettings | None = None,
    resume: bool = True,
    progress: ProgressFn | None = None,
) -> list[PredictResult]:
    """:func:`predict_image` for each target, then ``quantification.csv``.

    With ``resume``, an image whose ``<stem>.predict.json`` records the same model and settings
    (and whose outputs are all there) is not run again; its rows are reused. The table holds
    this run's images and every other image predicted into ``out_dir`` with the same model and
    settings. Raises :class:`ConfigError` before anything is written when an output would
    replace or land inside an input.
    """
    from simsearch_wsi.infer.quantify import write_table

    settings = settings or PredictSettings()
    source = model.bundle.source
    refuse_overwriting_inputs(
        targets, out_dir, inputs=[("model", source)] if source is not None else []
    )
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[PredictResult] = []
    try:
        for n, target in enumerate(targets):
            if progress is not None:
                progress("images", n, len(targets))
            results.append(
                predict_target(
                    target,
                    model,
                    out_dir=out_dir,
                    open_image=open_image,
                    settings=settings,
                    resume=resume,
                    progress=progress,
                )
            )
    except BaseException:
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a failed run leaves no empty output folder behind (issue 30)
        raise
    if progress is not None:
        progress("images", len(targets), len(targets))
    write_table(
        out_dir / "quantification.csv",
        table_rows(out_dir, model.identity, settings=settings, results=results),
    )
    return results
