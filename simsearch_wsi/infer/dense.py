"""Dense inference with a model bundle: class probability maps, detections, segmentation.

Never one window at a time. The trained trunk runs once over the image's tiles (as in
:mod:`simsearch_wsi.features.extractor`); because the pooling kernel and the linear head are both
linear, the head is applied to every feature **cell** first (``K`` scores per cell instead of ``D``
features), and the ``K``-channel score map is then pooled with the Gaussian window kernel:

    logits(i, j) = sum_cells kernel * (W f_cell) + b = W (sum_cells kernel * f_cell) + b

which is exactly the bundle's classifier on window ``(i, j)`` with the full tile context. Memory
is ``K`` floats per cell for the whole image (a 100k x 80k slide at 0.7 analysis downsample and
4 classes: about 250 MB), the features themselves live only per tile.

Frames. Window ``(i, j)`` has its top-left feature cell at ``(i, j)`` (as in
:mod:`simsearch_wsi.search.similarity`); its centre is analysis pixel
``(stride * (j + kw/2), stride * (i + kh/2))``.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.features.backbones import WeightsInfo, build_trunk
from simsearch_wsi.features.cache import FeatureCache
from simsearch_wsi.features.extractor import (
    AnalysisScale,
    FeatureExtractor,
    FeatureSpec,
    ProgressFn,
    analysis_tiles,
    iter_tile_features,
    make_feature_spec,
)
from simsearch_wsi.features.norm import FeatureNormalizer
from simsearch_wsi.features.preprocess import (
    ChannelNormalization,
    fit_normalization,
    search_normalization,
)
from simsearch_wsi.features.tissue import TissueMask, detect_foreground, no_foreground_error
from simsearch_wsi.io.base import ImageSource
from simsearch_wsi.qupath.geojson import BACKGROUND_CLASS, class_color
from simsearch_wsi.search.probe import (
    MemoryHead,
    memory_logits_maps,
    window_indices,
    window_vectors,
)
from simsearch_wsi.search.similarity import (
    DENSE_SPACING_FRACTION,
    PatchGeometry,
    local_maxima,
    pool,
    refine_peak,
    spaced_peaks,
)
from simsearch_wsi.train.bundle import ModelBundle
from simsearch_wsi.train.ensemble import combine_experts
from simsearch_wsi.train.fit import embed_patches
from simsearch_wsi.train.model import PatchEncoder
from simsearch_wsi.train.patches import CropGeometry, PatchReader, PatchSet

#: output pixels of the segmentation computed at once (bounds its temporaries)
_SEGMENT_BAND_PIXELS = 4_000_000


def bundle_digest(bundle: ModelBundle) -> str:
    """A short sha256 digest of a bundle's trunk and head weights, a search head's memory and
    the partner model's digest (what identifies a model's outputs, e.g. for resuming a run).
    A bundle without a memory or a partner digests as it did before either existed."""
    h = hashlib.sha256(bundle.head_weight.numpy().tobytes())
    h.update(bundle.head_bias.numpy().tobytes())
    for name, tensor in sorted(bundle.trunk_state.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if bundle.memory_vectors is not None and bundle.memory_owner is not None:
        # a search head's memory is most of the model: two reviews give two memories under
        # the same trunk (the search's, unchanged), and maybe close calibration weights
        h.update(b"memory:")
        h.update(bundle.memory_vectors.detach().cpu().contiguous().numpy().tobytes())
        h.update(bundle.memory_owner.detach().cpu().contiguous().numpy().tobytes())
    if bundle.expert_mask is not None:
        assert bundle.expert_weight is not None and bundle.expert_bias is not None
        h.update(b"expert:")
        h.update(bundle.expert_mask.detach().cpu().contiguous().numpy().tobytes())
        h.update(bundle.expert_weight.detach().cpu().float().contiguous().numpy().tobytes())
        h.update(bundle.expert_bias.detach().cpu().float().contiguous().numpy().tobytes())
        h.update(repr(float(bundle.expert_share)).encode())
    if bundle.partner is not None:
        h.update(b"partner:" + bundle_digest(bundle.partner).encode())
    return h.hexdigest()[:16]


class PatchModel:
    """A loaded bundle on a device: the trunk as a :class:`FeatureExtractor`, and the head
    (and the bundle's partner model as a :class:`PatchModel` of its own, ``partner``)."""

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        device: torch.device | str = "cpu",
        autocast: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        trunk, spec = bundle.build_trunk()
        #: a digest of the trunk and head weights (a rerun with the same model can be skipped)
        self.identity = bundle_digest(bundle)
        base = bundle.provenance.get("base_weights", {})
        shares_search_trunk = bundle.provenance.get("search_trunk", "search") == "search"
        if (
            bundle.head_input == "search"
            and shares_search_trunk
            and isinstance(base, dict)
            and base.get("identity")
        ):
            # the search's own trunk: its feature maps are the search's (a shared cache serves)
            info = WeightsInfo(
                str(base.get("kind", "bundle")), str(base["identity"]), "the search's trunk"
            )
        else:
            info = WeightsInfo("bundle", f"bundle:{self.identity}", "trained model bundle")
        self.bundle = bundle
        #: where a ``search``-head model keeps feature maps (``None``: a temporary folder per
        #: image, removed after use)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.extractor = FeatureExtractor(trunk, spec, info, device=device, autocast=autocast)
        self.weight = bundle.head_weight.float()  # (K, D); a search head's (K, 2) weights
        self.bias = bundle.head_bias.float()  # (K,)
        self.memory: MemoryHead | None = None
        if bundle.memory_vectors is not None and bundle.memory_owner is not None:
            classes = bundle.classes
            self.memory = MemoryHead(
                bundle.memory_vectors.float(),
                bundle.memory_owner,
                self.weight[:, 0],
                self.bias,
                classes.index(BACKGROUND_CLASS) if BACKGROUND_CLASS in classes else -1,
                self.weight[:, 1],
            )
        #: the similarity expert (a ``search`` head's memory restricted to the prototypes, its
        #: own logits; ``ModelBundle.expert_mask``), combined with the head's probabilities
        self.expert: MemoryHead | None = None
        if self.memory is not None and bundle.expert_mask is not None:
            assert bundle.expert_weight is not None and bundle.expert_bias is not None
            keep = bundle.expert_mask
            w = bundle.expert_weight.float()
            self.expert = MemoryHead(
                self.memory.vectors[keep],
                self.memory.owner[keep],
                w[:, 0],
                bundle.expert_bias.float(),
                self.memory.background,
                w[:, 1],
            )
        #: the bundle's partner model, whose probabilities are combined with this one's
        self.partner: PatchModel | None = (
            None
            if bundle.partner is None
            else PatchModel(bundle.partner, device=device, autocast=autocast, cache_dir=cache_dir)
        )

    @property
    def classes(self) -> tuple[str, ...]:
        return self.bundle.classes

    def patch_size_l0(self, image: ImageSource) -> tuple[float, float]:
        """The bundle's patch size on ``image``: by micrometres when both pixel sizes are known
        (so a model trained at 0.5 um/px works on 0.25 um/px slides), else in pixels."""
        um = self.bundle.patch_size_um
        if um is not None and image.mpp is not None:
            return (um[0] / image.mpp, um[1] / image.mpp)
        return self.bundle.patch_size_l0


def untrained_bundle(
    images: list[ImageSource],
    *,
    classes: tuple[str, ...] = ("ring", "cluster", "stripes", BACKGROUND_CLASS),
    patch_size_l0: float = 48.0,
    context_a: int = 32,
    threshold: float = 0.3,
    seed: int = 0,
) -> ModelBundle:
    """A bundle with seeded random trunk and head weights for ``images``' kind (channels,
    normalisation fitted on them, pixel size of the first): what benchmarks and tests of the
    inference path run when what matters is the work done, not the answers. RGB brightfield
    images get an RGB trunk, anything else is encoded channel by channel."""
    first = images[0]
    rgb = first.is_brightfield and first.n_channels == 3
    trunk, spec, _ = build_trunk("resnet18-l3", "random", seed=seed)
    scale = AnalysisScale.for_patch(first, patch_size_l0)
    geometry = PatchGeometry.from_l0(patch_size_l0, patch_size_l0, scale=scale, stride=spec.stride)
    dim = spec.out_channels * (1 if rgb else first.n_channels)
    gen = torch.Generator().manual_seed(seed)
    return ModelBundle(
        backbone="resnet18-l3",
        trunk_state=trunk.state_dict(),
        head_weight=torch.randn(len(classes), dim, generator=gen) * 0.1,
        head_bias=torch.zeros(len(classes)),
        classes=classes,
        colors={c: class_color(c) for c in classes},
        thresholds={c: threshold for c in classes},
        patch_size_l0=(patch_size_l0, patch_size_l0),
        mpp=first.mpp,
        analysis_downsample=scale.downsample_x,
        context_a=context_a,
        geometry=geometry.to_dict(),
        normalization=fit_normalization(images).to_dict(),
        channels=first.channel_names,
        rgb=rgb,
        strategy="pos",
        config={},
        metrics={},
    )


@dataclass(frozen=True)
class ClassMaps:
    """Class probabilities of every window of an image.

    ``probabilities`` (K, Hp, Wp) float32, NaN where a window's cells were not all embedded
    (outside the foreground tiles); ``classes`` in the bundle's order.
    ``rank_against_background``: detections are ranked by their class's log-odds against the
    background rather than against all other classes (:func:`ranking_scores`); set for search
    heads, whose class logits are each class's own evidence against the background.
    """

    probabilities: NDArray[np.float32]
    classes: tuple[str, ...]
    geometry: PatchGeometry
    spec: FeatureSpec
    image_size_l0: tuple[int, int]
    analysis_size: tuple[int, int]  # (width, height) of the image on the analysis grid
    foreground: TissueMask | None = None  # the mask that chose the tiles, when one did
    rank_against_background: bool = False

    @property
    def scale(self) -> AnalysisScale:
        return self.spec.scale

    def window_box_l0(
        self, i: float, j: float, *, size_a: tuple[float, float] | None = None
    ) -> BoxL0:
        """Level-0 box of window (i, j) (of ``size_a`` = (width, height) analysis px centred on
        the window, default the window's own size); a window at the border reaches past the
        image."""
        cx_a, cy_a = self.geometry.window_center_a(i, j)
        w_a, h_a = size_a or (self.geometry.width_a, self.geometry.height_a)
        return self.scale.box_to_l0(cx_a - w_a / 2, cy_a - h_a / 2, w_a, h_a)


def check_model_fits(bundle: ModelBundle, image: ImageSource) -> None:
    """Raise :class:`ConfigError` when ``image``'s channels do not suit ``bundle`` (the
    channels it needs, and for a patch-head model the channels its normalisation is for);
    reads the image's metadata only."""
    names = image.channel_names
    missing = [c for c in bundle.channels if c not in names]
    if missing:
        raise ConfigError(
            f"{image.path}: the model needs channels {list(bundle.channels)}, the image has "
            f"{list(names)}; run it on images of the kind it was trained on"
        )
    if bundle.head_input == "search":
        return
    normalization = bundle.channel_normalization()
    if normalization.channel_names != names:
        raise ConfigError(
            f"{image.path}: the model's normalisation is for channels "
            f"{list(normalization.channel_names)}, the image has {list(names)}"
        )


def dense_class_maps(
    image: ImageSource,
    model: PatchModel,
    *,
    tile_size: int = 1024,
    batch_size: int = 4,
    tiles: str = "foreground",
    progress: ProgressFn | None = None,
) -> ClassMaps:
    """Softmax class maps of ``image`` over every window (module docstring; a ``search``-head
    bundle scores the search's own window vectors, :mod:`simsearch_wsi.search.probe`; a
    bundle with a partner model combines both models' maps,
    :func:`simsearch_wsi.train.ensemble.combine_experts`)."""
    own = _class_maps(
        image, model, tile_size=tile_size, batch_size=batch_size, tiles=tiles, progress=progress
    )
    if model.partner is None:
        return own
    check_model_fits(model.partner.bundle, image)
    other, expert = _search_class_maps(
        image,
        model.partner,
        tile_size=tile_size,
        batch_size=batch_size,
        tiles=tiles,
        progress=progress,
    )
    if other.probabilities.shape != own.probabilities.shape:
        raise ConfigError(
            f"{image.path}: the model and its partner score different window grids "
            f"({own.probabilities.shape} vs {other.probabilities.shape}); re-train the model"
        )
    parts = [own.probabilities, other.probabilities]
    if expert is None:
        return replace(own, probabilities=combine_experts(parts))
    # the similarity expert (format version 4): a third expert at its share
    share = model.partner.bundle.expert_share
    return replace(own, probabilities=combine_experts([*parts, expert], weights=[1.0, 1.0, share]))


def _class_maps(
    image: ImageSource,
    model: PatchModel,
    *,
    tile_size: int,
    batch_size: int,
    tiles: str,
    progress: ProgressFn | None,
) -> ClassMaps:
    """:func:`dense_class_maps` of one model (its partner not included)."""
    bundle = model.bundle
    ext = model.extractor
    check_model_fits(bundle, image)
    if bundle.head_input == "search":
        return _search_class_maps(
            image, model, tile_size=tile_size, batch_size=batch_size, tiles=tiles, progress=progress
        )[0]
    normalization = bundle.channel_normalization()
    width_l0, height_l0 = model.patch_size_l0(image)
    scale = AnalysisScale.for_patch(image, max(width_l0, height_l0))
    spec = make_feature_spec(
        image,
        ext,
        scale=scale,
        normalization=normalization,
        channels=list(bundle.channels),
        tile_size=tile_size,
        tiles=tiles,
    )
    geometry = PatchGeometry.from_l0(width_l0, height_l0, scale=scale, stride=ext.stride)
    mask = detect_foreground(image) if tiles == "foreground" else None
    grid, _, _ = analysis_tiles(image, spec, mask=mask)
    if not grid:  # as the search says it (issue 30): never a silent empty result
        raise no_foreground_error(image)
    width_a, height_a = scale.analysis_size(image)
    s = ext.stride
    hc, wc = -(-height_a // s), -(-width_a // s)
    k = len(bundle.classes)
    scores = torch.zeros(k, hc, wc)
    embedded = torch.zeros(1, hc, wc)
    weight = model.weight
    for tl, f in iter_tile_features(
        image, ext, spec=spec, tiles=grid, batch_size=batch_size, progress=progress
    ):
        y0, x0 = tl.y_a // s, tl.x_a // s
        h, w = f.shape[1], f.shape[2]
        scores[:, y0 : y0 + h, x0 : x0 + w] = torch.einsum("kd,dhw->khw", weight, f)
        embedded[:, y0 : y0 + h, x0 : x0 + w] = 1.0
    kernel = geometry.kernel()
    kh, kw = geometry.kernel_hw
    if hc < kh or wc < kw:
        raise ConfigError(f"{image.path}: the image is smaller than one model patch")
    logits = pool(scores, kernel) + model.bias.view(-1, 1, 1)
    covered = pool(embedded, kernel)[0] > 1.0 - 1e-4
    probs = torch.softmax(logits, dim=0)
    probs[:, ~covered] = math.nan
    return ClassMaps(
        probabilities=probs.numpy().astype(np.float32),
        classes=bundle.classes,
        geometry=geometry,
        spec=spec,
        image_size_l0=image.dimensions,
        analysis_size=(width_a, height_a),
        foreground=mask,
    )


def _search_spec(
    image: ImageSource, model: PatchModel, *, tile_size: int, tiles: str
) -> tuple[FeatureSpec, PatchGeometry]:
    """The search's feature spec of ``image`` for a ``search``-head model: the image's own
    channel normalisation (as :class:`simsearch_wsi.search.engine.SimSearch` fits it), the model's
    channels and patch geometry."""
    width_l0, height_l0 = model.patch_size_l0(image)
    scale = AnalysisScale.for_patch(image, max(width_l0, height_l0))
    spec = make_feature_spec(
        image,
        model.extractor,
        scale=scale,
        normalization=search_normalization(image),
        channels=list(model.bundle.channels),
        tile_size=tile_size,
        tiles=tiles,
    )
    return spec, PatchGeometry.from_l0(
        width_l0, height_l0, scale=scale, stride=model.extractor.stride
    )


@contextmanager
def _feature_cache(model: PatchModel) -> Iterator[FeatureCache]:
    if model.cache_dir is not None:
        yield FeatureCache(model.cache_dir)
        return
    with tempfile.TemporaryDirectory(prefix="simsearch-features-") as tmp:
        yield FeatureCache(tmp)


def _search_class_maps(
    image: ImageSource,
    model: PatchModel,
    *,
    tile_size: int,
    batch_size: int,
    tiles: str,
    progress: ProgressFn | None,
) -> tuple[ClassMaps, NDArray[np.float32] | None]:
    """A ``search`` head's class maps, and its similarity expert's (K, Hp, Wp) probabilities
    (``None`` without one) from the same pass over the windows."""
    bundle = model.bundle
    spec, geometry = _search_spec(image, model, tile_size=tile_size, tiles=tiles)
    with _feature_cache(model) as cache:
        fmap = cache.get_or_compute(
            image, model.extractor, spec=spec, batch_size=batch_size, progress=progress
        )
        normalizer = FeatureNormalizer.of(fmap, bundle.feature_norm)
        assert model.memory is not None  # a search head always has one (ModelBundle checks)
        heads = [model.memory] if model.expert is None else [model.memory, model.expert]
        logits, *rest = memory_logits_maps(fmap, geometry, normalizer=normalizer, heads=heads)
    probs = torch.softmax(torch.from_numpy(logits), dim=0).numpy().astype(np.float32)
    expert = (
        torch.softmax(torch.from_numpy(rest[0]), dim=0).numpy().astype(np.float32) if rest else None
    )
    width_a, height_a = spec.scale.analysis_size(image)
    maps = ClassMaps(
        probabilities=probs,
        classes=bundle.classes,
        geometry=geometry,
        spec=spec,
        image_size_l0=image.dimensions,
        analysis_size=(width_a, height_a),
        foreground=detect_foreground(image) if tiles == "foreground" else None,
        rank_against_background=True,
    )
    return maps, expert


@dataclass(frozen=True)
class Detection:
    """A local maximum of a class map: class, level-0 box, and every class's probability.

    ``score`` is what rankings and PR curves should use (:func:`ranking_scores`): the class's
    log-odds against the background, ``log p_c - log p_background``, for a search head (or an
    ensemble of them), else against all other classes; still ordered where float32
    probabilities have all rounded to 1."""

    class_name: str
    box: BoxL0
    probability: float
    probabilities: dict[str, float]
    score: float = math.nan


def class_log_odds(p: NDArray[np.float32], c: int) -> NDArray[np.float32]:
    """(Hp, Wp) log-odds of class ``c`` against the others from probabilities (K, Hp, Wp),
    computed from the other classes' (small, representable) probabilities so that it keeps
    its order where ``p[c]`` has rounded to 1."""
    tiny = np.float32(1e-30)
    others = np.nansum(np.delete(p, c, axis=0), axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        odds = np.log(np.maximum(p[c], tiny)) - np.log(np.maximum(others, tiny))
    out: NDArray[np.float32] = np.asarray(odds, dtype=np.float32)
    out[~np.isfinite(p[c])] = np.nan
    return out


def reachable_threshold(threshold: float) -> float:
    """A class's probability threshold as compared (``p >= t``): 1 or more is never reached (a
    threshold of 1 turns the class off), although a float32 probability can round to exactly
    1 where one class's logit is far above the others'."""
    return math.inf if threshold >= 1.0 else float(threshold)


def ranking_scores(p: NDArray[np.float32], c: int, *, background: int) -> NDArray[np.float32]:
    """(Hp, Wp) the score that ranks class ``c``'s detections, from probabilities (K, Hp, Wp):
    ``log p_c - log p_background`` (``background`` >= 0), else :func:`class_log_odds`.

    Against the background only, for search heads (:attr:`ClassMaps.rank_against_background`):
    their logit of a class is that class's own evidence (similarity to its memory against the
    background's logit 0), and a detection already goes to the most probable of the user's
    classes, so a true object that also looks a little like another class keeps its rank; the
    other classes' share, in :func:`class_log_odds`, ranked it below a window that is half
    background. Not for the linear head, whose logits are fitted to tell the classes apart
    (docs/evaluation.md, "detections of the search heads ranked against the background").
    Peaks are placed on :func:`class_log_odds` either way: where the background's probability
    is near 0 its logarithm is noise, and peaks placed on it were spurious."""
    if background < 0:
        return class_log_odds(p, c)
    tiny = np.float32(1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        odds = np.log(np.maximum(p[c], tiny)) - np.log(np.maximum(p[background], tiny))
    out: NDArray[np.float32] = np.asarray(odds, dtype=np.float32)
    out[~np.isfinite(p[c])] = np.nan
    return out


def detect(
    maps: ClassMaps,
    thresholds: dict[str, float],
    *,
    max_per_class: int = 100_000,
    object_size_l0: tuple[float, float] | None = None,
    spacing_patches: float = 1.0,
) -> list[Detection]:
    """Local maxima of each (non-background) class's log-odds map (:func:`class_log_odds`)
    where the class reaches its probability threshold (1: never) and is the most probable class; at
    least ``spacing_patches`` patch widths apart within a class (on the cell grid, at least one
    cell), placed with sub-cell precision (a parabola through the neighbours, as the search
    places its suggestions). Boxes are the model's patch, clipped to the image. Each is scored
    (ranked) by :func:`ranking_scores` at its peak.

    ``object_size_l0`` (width, height in level-0 px; objects smaller than the patch, which may
    touch): detections are kept :data:`~simsearch_wsi.search.similarity.DENSE_SPACING_FRACTION`
    of the object's shorter side apart instead (between refined centres, as the search's dense
    mode) and their boxes are the object's size. Raises :class:`ConfigError` when it is not
    positive or is larger than the patch."""
    p = maps.probabilities
    finite = np.isfinite(p).all(axis=0)
    # the most probable class among the user's classes (background competes through the
    # thresholds: a window below its class's threshold is not a detection)
    fg = np.array([n != BACKGROUND_CLASS for n in maps.classes])
    ranked = np.where(np.isfinite(p) & fg[:, None, None], p, -1.0)
    best = np.where(finite, np.argmax(ranked, axis=0), -1)
    kh, kw = maps.geometry.kernel_hw
    object_a = None
    if object_size_l0 is not None:
        ow_l0, oh_l0 = object_size_l0
        patch = maps.window_box_l0(0, 0)
        if not all(math.isfinite(v) and v > 0 for v in object_size_l0):
            raise ConfigError(f"object size must be > 0 level-0 pixels, got {ow_l0}x{oh_l0}")
        if ow_l0 > patch.width_l0 + 1e-6 or oh_l0 > patch.height_l0 + 1e-6:
            raise ConfigError(
                f"object size {ow_l0:g}x{oh_l0:g} px is larger than the model's patch "
                f"({patch.width_l0:g}x{patch.height_l0:g} level-0 px on this image); the object "
                "size is for objects smaller than the patch: leave it out"
            )
        _, _, ow_a, oh_a = maps.scale.box_to_analysis(BoxL0(0, 0, ow_l0, oh_l0))
        object_a = (ow_a, oh_a)
    background = (
        maps.classes.index(BACKGROUND_CLASS)
        if maps.rank_against_background and BACKGROUND_CLASS in maps.classes
        else -1
    )
    out: list[Detection] = []
    for c, name in enumerate(maps.classes):
        if name == BACKGROUND_CLASS:
            continue
        odds = class_log_odds(p, c)
        scores = odds if background < 0 else ranking_scores(p, c, background=background)
        keep = (best == c) & (p[c] >= reachable_threshold(thresholds.get(name, 0.5)))
        m = np.where(keep, odds, np.nan).astype(np.float32)
        if object_a is None:
            peaks = [
                (int(i), int(j), *refine_peak(odds, int(i), int(j)))
                for i, j in local_maxima(
                    m,
                    threshold=-1e6,  # below any log-odds; above the NaN fill
                    min_distance_cells=max(1, math.floor(spacing_patches * max(kh, kw))),
                    max_peaks=max_per_class,
                )
            ]
        else:
            peaks = spaced_peaks(
                m,
                geometry=maps.geometry,
                threshold=-1e6,
                spacing_a=DENSE_SPACING_FRACTION * min(object_a),
                max_peaks=max_per_class,
            )
        for i, j, di, dj in peaks:
            probs = {n: float(p[k, i, j]) for k, n in enumerate(maps.classes)}
            # clipped to the image: QuPath objects stay inside it
            box = maps.window_box_l0(i + di, j + dj, size_a=object_a).clipped(*maps.image_size_l0)
            out.append(Detection(name, box, probs[name], probs, float(scores[i, j])))
    return out


@dataclass(frozen=True)
class Segmentation:
    """A label mask on a grid of ``downsample`` level-0 pixels per mask pixel.

    ``labels`` (H, W) uint8/uint16: 0 = unclassified (below threshold, background class, or
    not embedded), ``k`` = ``classes[k - 1]``; ``probabilities`` (K', H, W) float32 of the same
    classes (NaN outside embedded windows).
    """

    labels: NDArray[np.integer[Any]]
    probabilities: NDArray[np.float32]
    classes: tuple[str, ...]
    downsample: tuple[float, float]


def segment(
    maps: ClassMaps,
    thresholds: dict[str, float],
    *,
    cell_subdivision: int = 4,
) -> Segmentation:
    """Probability maps resized to a grid of ``stride / cell_subdivision`` analysis pixels, then
    each pixel gets the most probable class if it reaches that class's threshold (the paper's
    rule; a threshold of 1 is never reached, :func:`reachable_threshold`); background and
    below-threshold pixels are 0.

    The window map is aligned on the feature-cell grid (window (i, j) is centred at cell
    ``(i + kh/2, j + kw/2)``) and interpolated bilinearly, NaN (not embedded) kept as NaN.
    """
    p = maps.probabilities
    k, hp, wp = p.shape
    kh, kw = maps.geometry.kernel_hw
    s = maps.geometry.stride
    width_a, height_a = maps.analysis_size
    sub = cell_subdivision
    out_h, out_w = -(-height_a * sub // s), -(-width_a * sub // s)
    # pixel (y, x) of the output grid is centred at analysis ((x + 0.5) * s / sub, ...); window
    # (i, j) is centred at analysis (s * (j + kw / 2), s * (i + kh / 2)): its index is
    # j = (x + 0.5) / sub - kw / 2, sampled with grid_sample (align_corners=True on indices).
    ys = (np.arange(out_h) + 0.5) / sub - kh / 2
    xs = (np.arange(out_w) + 0.5) / sub - kw / 2
    gy_all = torch.from_numpy(2 * ys / max(hp - 1, 1) - 1).float()
    gx = torch.from_numpy(2 * xs / max(wp - 1, 1) - 1).float()
    src = torch.from_numpy(p)
    nan = torch.isnan(src).any(dim=0, keepdim=True).float()
    filled = torch.nan_to_num(src, nan=0.0)
    keep = [c for c, name in enumerate(maps.classes) if name != BACKGROUND_CLASS]
    names = tuple(maps.classes[c] for c in keep)
    thr = torch.tensor([reachable_threshold(thresholds.get(n, 0.5)) for n in maps.classes])
    label_of = torch.zeros(k, dtype=torch.int64)
    for rank, c in enumerate(keep, start=1):
        label_of[c] = rank
    dtype = np.uint8 if len(names) < 255 else np.uint16
    labels = np.zeros((out_h, out_w), dtype=dtype)
    probs_out = np.empty((len(keep), out_h, out_w), dtype=np.float32)
    # in bands of rows, so temporaries stay at a few (K, band, W) arrays on large slides
    band = max(1, _SEGMENT_BAND_PIXELS // max(out_w, 1))
    for y0 in range(0, out_h, band):
        gy = gy_all[y0 : y0 + band]
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]  # (1, h, W, 2)
        up = F.grid_sample(
            filled[None], grid, mode="bilinear", padding_mode="border", align_corners=True
        )[0]
        invalid = (
            F.grid_sample(
                nan[None], grid, mode="bilinear", padding_mode="border", align_corners=True
            )[0, 0]
            > 0.5
        )
        best_p, best = up.max(dim=0)
        lab = torch.where((best_p >= thr[best]) & ~invalid, label_of[best], torch.zeros_like(best))
        labels[y0 : y0 + len(gy)] = lab.numpy()
        part = up[keep]
        part[:, invalid] = math.nan
        probs_out[:, y0 : y0 + len(gy)] = part.numpy()
    ds = s / sub
    return Segmentation(
        labels=labels,
        probabilities=probs_out,
        classes=names,
        downsample=(ds * maps.scale.downsample_x, ds * maps.scale.downsample_y),
    )


def predict_patches(
    bundle: ModelBundle,
    patches: PatchSet,
    *,
    open_image: Callable[[str], ImageSource],
    device: torch.device | str = "cpu",
    autocast: bool = True,
    batch_size: int = 64,
) -> NDArray[np.float32]:
    """Class probabilities (N, K) of a bundle's classifier on individual patches, K in
    ``bundle.classes`` order: a ``trunk`` head on crops read with the bundle's context (no
    augmentation), a ``search`` head on the search's window vectors at the patches' centres;
    with a partner model, both models' probabilities combined
    (:func:`simsearch_wsi.train.ensemble.combine_experts`)."""
    if bundle.partner is not None:
        own = predict_patches(
            replace(bundle, partner=None),
            patches,
            open_image=open_image,
            device=device,
            autocast=autocast,
            batch_size=batch_size,
        )
        partner = PatchModel(bundle.partner, device=torch.device(device), autocast=autocast)
        other, expert = _search_patch_probabilities(partner, patches, open_image)
        if expert is None:
            return combine_experts([own, other], class_axis=1)
        return combine_experts(
            [own, other, expert], class_axis=1, weights=[1.0, 1.0, bundle.partner.expert_share]
        )
    device = torch.device(device)
    if bundle.head_input == "search":
        return _search_patch_probabilities(
            PatchModel(bundle, device=device, autocast=autocast), patches, open_image
        )[0]
    trunk, spec = bundle.build_trunk()
    trunk = trunk.to(device).to(memory_format=torch.channels_last)
    geometry = PatchGeometry(**bundle.geometry)
    encoder = PatchEncoder(
        trunk, spec, geometry=geometry, rgb=bundle.rgb, context_a=bundle.context_a
    )
    encoder.to(device)
    crop = CropGeometry(max(bundle.patch_size_l0), encoder.window_a, bundle.context_a, 0)
    normalization = ChannelNormalization.from_dict(bundle.normalization)
    with PatchReader(
        crop, normalization, channels=bundle.channels, open_image=open_image
    ) as reader:
        feats = embed_patches(
            encoder,
            reader,
            patches=patches,
            device=device,
            autocast=autocast,
            batch_size=batch_size,
        )[0]
    logits = feats @ bundle.head_weight.float().T + bundle.head_bias.float()
    out: NDArray[np.float32] = torch.softmax(logits, dim=1).numpy()
    return out


def _search_patch_probabilities(
    model: PatchModel, patches: PatchSet, open_image: Callable[[str], ImageSource]
) -> tuple[NDArray[np.float32], NDArray[np.float32] | None]:
    """(N, K) a ``search`` head's probabilities of ``patches``, and its similarity expert's
    (``None`` without one)."""
    out = np.zeros((len(patches), model.bundle.n_classes), np.float32)
    expert = None if model.expert is None else np.zeros_like(out)
    by_image: dict[str, list[int]] = {}
    for n, sample in enumerate(patches.samples):
        by_image.setdefault(sample.image, []).append(n)
    for path, rows in by_image.items():
        with open_image(path) as image, _feature_cache(model) as cache:
            spec, geometry = _search_spec(image, model, tile_size=1024, tiles="foreground")
            fmap = cache.get_or_compute(image, model.extractor, spec=spec)
            normalizer = FeatureNormalizer.of(fmap, model.bundle.feature_norm)
            kh, kw = geometry.kernel_hw
            hf, wf, _ = fmap.shape
            centers_a = np.array(
                [
                    (
                        patches.samples[n].center_l0[0] / spec.scale.downsample_x,
                        patches.samples[n].center_l0[1] / spec.scale.downsample_y,
                    )
                    for n in rows
                ]
            )
            ij = window_indices(centers_a, geometry, pooled_hw=(hf - kh + 1, wf - kw + 1))
            vecs = window_vectors(fmap, geometry, normalizer=normalizer, windows_ij=ij)
        assert model.memory is not None
        out[rows] = model.memory.probabilities(vecs)
        if expert is not None and model.expert is not None:
            expert[rows] = model.expert.probabilities(vecs)
    return out, expert
