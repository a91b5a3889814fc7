"""Similarity search for one image: embed once (cached), then answer prototype queries cheaply.

This is the orchestration layer the CLI and the server share. The first prototype of an
experiment fixes the patch size (its level-0 width and height) and so the analysis scale; later
prototypes of other sizes are embedded at the experiment's patch size, centred on their own box
centre (their own size is not used).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.features.cache import FeatureCache, FeatureMap
from simsearch_wsi.features.extractor import (
    AnalysisScale,
    FeatureExtractor,
    FeatureSpec,
    ProgressFn,
    make_feature_spec,
)
from simsearch_wsi.features.norm import DEFAULT_FEATURE_NORM, FeatureNormalizer, check_feature_norm
from simsearch_wsi.features.preprocess import ChannelNormalization, search_normalization
from simsearch_wsi.io.base import ImageSource
from simsearch_wsi.qupath.geojson import Annotation, box_feature
from simsearch_wsi.search import objects as object_rule
from simsearch_wsi.search.heatmap import HeatMap, heatmap_l0
from simsearch_wsi.search.objects import (
    CANDIDATE_RULES,
    ObjectCandidates,
    detect_objects,
    embed_boxes,
    find_objects,
    snap_to_objects,
)
from simsearch_wsi.search.similarity import (
    DENSE_POOL_FRACTION,
    PatchGeometry,
    PooledMap,
    Prototype,
    PrototypeVectors,
    Suggestion,
    background_candidates,
    embed_prototypes,
    extract_suggestions,
    pooled_map,
    similarity_maps,
)
from simsearch_wsi.search.validation import check_box, check_class_name
from simsearch_wsi.search.validation import prototypes_from_annotations as validated_prototypes

#: Opens an image by path (the server passes one that refuses paths outside its folders).
ImageOpener = Callable[[str], ImageSource]

#: ``dense_fine``: the object lands at about this many analysis pixels (up to
#: DENSE_MAX_UPSAMPLE x upsampled), twice a patch's, so a feature cell is an eighth of an object
DENSE_OBJECT_PX = 128.0
DENSE_MAX_UPSAMPLE = 8.0
#: ``dense_fine`` refuses an image whose feature map (float16 on disk, in the cache) would take
#: more than this: at 8x upsampling a level-0 pixel costs 128 bytes per 256-channel encoding
#: (a 2000 x 2000 px region 0.5 GB, a 100k x 100k px slide 1.3 TB)
DENSE_FINE_MAX_BYTES = 16 * 2**30

# Cosine similarity between standardised pooled vectors; a starting point the user moves.
DEFAULT_THRESHOLD = 0.5

#: ``dense="auto"``: the dense rule applies when the prototype boxes outline objects of one size,
#: i.e. the longest box side is at most this many times the shortest (measured:
#: docs/evaluation.md, "Search quality suite (issue 18)")
AUTO_DENSE_SIZE_RATIO = 2.0


@dataclass(frozen=True)
class SearchSettings:
    """Knobs of the search. ``feature_norm`` (:mod:`simsearch_wsi.features.norm`) changes the
    similarity values, so thresholds are tied to it; the others do not change what a suggestion
    means.

    ``dense`` (default ``True``, the object rule): the prototype boxes are the objects (e.g.
    nuclei drawn tightly), which may touch. The object size is the median prototype box; the
    analysis scale is set by it; features are pooled over
    :data:`~simsearch_wsi.search.similarity.DENSE_POOL_FRACTION` of it (of the experiment's
    patch size where one is given, e.g. a session's); suggestions are kept
    :data:`~simsearch_wsi.search.similarity.DENSE_SPACING_FRACTION` of the object's shorter
    side apart and their boxes are the object's size. The default since the search quality
    suite (docs/evaluation.md, "Search quality suite (issue 18)"): as good or better than the
    patch rule on every case, dev and held-out. ``False`` (the patch rule, the default before):
    the first prototype's box is the patch, suggestions are ``min_distance_fraction`` patch
    widths apart, boxes are the patch. ``dense_fine`` (with ``dense``): a finer analysis scale,
    the object at about :data:`DENSE_OBJECT_PX` analysis pixels (up to
    :data:`DENSE_MAX_UPSAMPLE` x upsampled), for objects closer together than the trunk's stride
    resolves; about 4x the embedding work.
    An image whose feature map would take more than ``dense_fine_max_bytes`` (cells x channels x
    2 bytes, the whole image) is refused before embedding (:meth:`SimSearch.feature_spec`).
    ``dense="auto"``: the dense rule when the prototypes' boxes agree in size (the longest side
    at most :data:`AUTO_DENSE_SIZE_RATIO` times the shortest; :func:`resolve_dense`), else the
    patch rule; ``dense_fine`` needs ``dense=True``.

    ``expand`` (query expansion): after a first pass, the ``expand`` most similar suggestions
    of each class on the image (at or above the class's threshold; a ``floor``'s candidates
    below it never) join its prototypes for a second pass; the suggestions are those of the
    second pass. 0: one pass."""

    tile_size: int = 1024
    batch_size: int = 4
    feature_norm: str = DEFAULT_FEATURE_NORM
    min_distance_fraction: float = 1.0
    max_per_class: int = 500
    channels: tuple[str, ...] | None = None
    dense: bool | str = True
    dense_fine: bool = False
    dense_fine_max_bytes: int = DENSE_FINE_MAX_BYTES
    expand: int = 0
    #: ``"foreground"``: embed the tiles the foreground mask touches; ``"all"``: every tile
    tiles: str = "foreground"
    #: ``"grid"``: candidates are the maxima of the similarity maps; ``"objects"``: one per
    #: object found in the image, embedded at its own size (:mod:`simsearch_wsi.search.objects`);
    #: ``"auto"`` (the default): objects where the prototypes outline separate objects
    #: (:meth:`SimSearch.resolve_candidates`), else the grid (docs/evaluation.md, "2026-12-07:
    #: object candidates": no case worse on dev or held-out, the plate and IHC cells better)
    candidates: str = "auto"

    def __post_init__(self) -> None:
        check_feature_norm(self.feature_norm)
        if not (isinstance(self.dense, bool) or self.dense == "auto"):
            raise ConfigError(f"dense must be True, False or 'auto', got {self.dense!r}")
        if self.dense_fine and self.dense is not True:
            raise ConfigError(f"dense_fine needs dense=True, got dense={self.dense!r}")
        if isinstance(self.expand, bool) or not isinstance(self.expand, int) or self.expand < 0:
            raise ConfigError(f"expand must be an integer >= 0, got {self.expand!r}")
        if self.tiles not in ("foreground", "all"):
            raise ConfigError(f"tiles must be 'foreground' or 'all', got {self.tiles!r}")
        if self.candidates not in CANDIDATE_RULES:
            raise ConfigError(
                f"candidates must be one of {', '.join(CANDIDATE_RULES)}, got {self.candidates!r}"
            )
        if self.candidates == "objects" and (self.dense is False or self.dense_fine):
            raise ConfigError(
                "candidates='objects' is a form of the object rule: it needs dense=True or "
                f"'auto' and no dense_fine, got dense={self.dense!r}, "
                f"dense_fine={self.dense_fine!r}"
            )


@dataclass
class SuggestResult:
    """Suggestions for one image, with everything needed to reproduce them."""

    image: str
    classes: tuple[str, ...]
    thresholds: dict[str, float]
    suggestions: list[Suggestion]
    background: list[Suggestion]
    scale: AnalysisScale
    geometry: PatchGeometry
    feature_cache: str
    weights: str
    seconds_embed: float
    seconds_query: float
    feature_norm: str = DEFAULT_FEATURE_NORM
    notes: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    object_size_l0: tuple[float, float] | None = None
    #: the lowest similarity asked for (candidates below a class threshold, for a viewer's
    #: live threshold); None: only suggestions above the thresholds
    floor: float | None = None
    #: query expansion (``SearchSettings.expand``): the first pass's hits per class that joined
    #: the prototypes for the second pass (0: one pass)
    expand: int = 0
    #: per-class similarity heat maps (``suggest(heatmap=True)``), level-0 aligned
    heatmap: HeatMap | None = None
    #: where the suggestions came from (``SearchSettings.candidates``)
    candidates: str = "grid"

    def __post_init__(self) -> None:
        # stable ids: the GeoJSON ids QuPath keeps, by which a review is matched to suggestions
        if not self.ids:
            n = len(self.suggestions) + len(self.background)
            self.ids = [str(uuid.uuid4()) for _ in range(n)]

    def all_suggestions(self) -> list[tuple[str, Suggestion]]:
        """(id, suggestion) pairs: class suggestions, then background candidates."""
        return list(zip(self.ids, [*self.suggestions, *self.background], strict=True))

    def geojson_features(self) -> list[dict[str, Any]]:
        """QuPath detections named ``<class> #<rank>``, with ``similarity`` and ``rank``."""
        return [
            box_feature(
                s.box,
                class_name=s.class_name,
                measurements={"similarity": s.similarity, "rank": s.rank},
                name=f"{s.class_name} #{s.rank}",
                id=sid,
            )
            for sid, s in self.all_suggestions()
        ]

    def summary(self) -> dict[str, Any]:
        per_class = {c: sum(1 for s in self.suggestions if s.class_name == c) for c in self.classes}
        above = {
            c: sum(
                1
                for s in self.suggestions
                if s.class_name == c and s.similarity >= self.thresholds[c]
            )
            for c in self.classes
        }
        return {
            "image": self.image,
            "suggestions_per_class": per_class,
            "above_threshold_per_class": above,
            "floor": self.floor,
            "expand": self.expand,
            "candidates": self.candidates,
            "background_candidates": len(self.background),
            "thresholds": self.thresholds,
            "analysis_scale": self.scale.to_dict(),
            "patch": self.geometry.to_dict(),
            "object_size_l0": list(self.object_size_l0) if self.object_size_l0 else None,
            "feature_cache": self.feature_cache,
            "weights": self.weights,
            "feature_norm": self.feature_norm,
            "seconds_embed": round(self.seconds_embed, 3),
            "seconds_query": round(self.seconds_query, 3),
            "notes": self.notes,
        }


@dataclass(frozen=True)
class SimilarityMaps:
    """Similarity maps of one image and what they were computed with."""

    spec: FeatureSpec
    fmap: FeatureMap
    geometry: PatchGeometry
    classes: tuple[str, ...]
    maps: NDArray[np.float32]
    here: list[Prototype]
    seconds_embed: float


def prototypes_from_annotations(
    annotations: Sequence[Annotation], image: ImageSource, *, where: str
) -> list[Prototype]:
    """Classified rectangle annotations are prototypes. Everything else is ignored.

    The checks are :func:`simsearch_wsi.search.validation.prototype_from_annotation`'s (the ones
    ``review`` applies too). Raises :class:`ConfigError` when there is none, or a prototype has
    a reserved class, is empty, non-finite or outside the image.
    """
    protos = validated_prototypes(annotations, where=where, image_size_l0=image.dimensions)
    if not protos:
        raise ConfigError(
            f"{where}: no prototypes found; draw classified rectangle annotations around examples "
            "(classification set, rectangle tool) and export them"
        )
    return protos


class SimSearch:
    """Embed once, query many times (feature maps cached per image on disk)."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        cache: FeatureCache,
        *,
        settings: SearchSettings | None = None,
    ) -> None:
        self.extractor = extractor
        self.cache = cache
        self.settings = settings or SearchSettings()
        self._normalizations: dict[str, ChannelNormalization] = {}

    def with_settings(self, **changes: Any) -> SimSearch:
        """This search with some :class:`SearchSettings` changed (``dataclasses.replace``),
        sharing its trunk, feature cache and fitted intensity normalisations; ``self`` when
        nothing changes."""
        settings = dataclasses.replace(self.settings, **changes)
        if settings == self.settings:
            return self
        other = SimSearch(self.extractor, self.cache, settings=settings)
        other._normalizations = self._normalizations
        return other

    def normalization_for(self, image: ImageSource) -> ChannelNormalization:
        """Brightfield: fixed 0..255; otherwise the paper's percentile rule over the image's
        plate, or the image alone (:func:`~simsearch_wsi.features.preprocess.search_normalization`).

        Fitted once per image (by identity) and kept, so repeated queries read no pixels."""
        key = image.identity()
        if key not in self._normalizations:
            self._normalizations[key] = search_normalization(image)
        return self._normalizations[key]

    def feature_spec(
        self,
        image: ImageSource,
        patch_size_l0: float,
        *,
        normalization: ChannelNormalization | None = None,
    ) -> FeatureSpec:
        """What the image's feature map for patches of ``patch_size_l0`` level-0 px is made
        with. Raises :class:`ConfigError` with ``dense_fine`` when the map would take more than
        ``settings.dense_fine_max_bytes``."""
        fine = self.settings.dense is True and self.settings.dense_fine
        if fine:
            # small objects: a finer scale than a patch gets (measured in docs/evaluation.md)
            scale = AnalysisScale.for_patch(
                image, patch_size_l0, target_px=DENSE_OBJECT_PX, max_upsample=DENSE_MAX_UPSAMPLE
            )
        else:
            scale = AnalysisScale.for_patch(image, patch_size_l0)
        spec = make_feature_spec(
            image,
            self.extractor,
            scale=scale,
            normalization=normalization or self.normalization_for(image),
            channels=self.settings.channels,
            tile_size=self.settings.tile_size,
            tiles=self.settings.tiles,
        )
        if fine:
            self._check_dense_fine_size(image, spec)
        return spec

    def _check_dense_fine_size(self, image: ImageSource, spec: FeatureSpec) -> None:
        """Refuse a ``dense_fine`` feature map over the byte budget (before any embedding)."""
        s = self.extractor.stride
        width_a, height_a = spec.scale.analysis_size(image)
        cells = -(-width_a // s) * -(-height_a // s)
        d = self.extractor.out_dim(len(spec.channels), spec.rgb)
        n_bytes = cells * d * 2  # float16
        limit = self.settings.dense_fine_max_bytes
        if n_bytes > limit:
            w0, h0 = image.dimensions
            raise ConfigError(
                f"{image.path}: --dense-fine would embed this {w0}x{h0} px image "
                f"at {1 / spec.scale.downsample_x:g}x its resolution, a feature map of about "
                f"{n_bytes / 2**30:.1f} GiB ({cells} cells x {d} channels; limit "
                f"{limit / 2**30:.1f} GiB) and the time to match; crop the image to a region "
                "(e.g. export one from QuPath) or use --dense"
            )

    def embed(
        self,
        image: ImageSource,
        patch_size_l0: float,
        *,
        normalization: ChannelNormalization | None = None,
        progress: ProgressFn | None = None,
    ) -> tuple[FeatureSpec, FeatureMap]:
        """The image's feature map at the scale for ``patch_size_l0``, from the cache or computed
        over foreground tiles."""
        spec = self.feature_spec(image, patch_size_l0, normalization=normalization)
        fmap = self.cache.get_or_compute(
            image,
            self.extractor,
            spec=spec,
            batch_size=self.settings.batch_size,
            progress=progress,
        )
        return spec, fmap

    def window_size_l0(self, size_l0: float) -> float:
        """The window (level-0 px) a suggest pools over when the prototypes are squares of
        ``size_l0``: the object rule (``settings.dense`` ``True``) pools over
        :data:`~simsearch_wsi.search.similarity.DENSE_POOL_FRACTION` of the object, the patch
        rule over the patch (``"auto"``: the object rule, as for prototypes of one size); what
        ``embed`` pools ahead of time."""
        return DENSE_POOL_FRACTION * size_l0 if self.settings.dense else size_l0

    def pool(
        self,
        spec: FeatureSpec,
        fmap: FeatureMap,
        *,
        patch_size_l0: float,
        progress: ProgressFn | None = None,
    ) -> PooledMap:
        """Pool the map for square patches of ``patch_size_l0`` level-0 pixels (cached), so
        that queries with prototypes of that size need no pooling."""
        geometry = PatchGeometry.from_l0(
            patch_size_l0, patch_size_l0, scale=spec.scale, stride=self.extractor.stride
        )
        return pooled_map(fmap, geometry, norm=self.settings.feature_norm, progress=progress)

    def suggest(
        self,
        image: ImageSource,
        prototypes: Sequence[Prototype],
        *,
        thresholds: dict[str, float] | None = None,
        n_background: int = 0,
        avoid: Sequence[BoxL0] = (),
        patch_size_l0: tuple[float, float] | None = None,
        normalization: ChannelNormalization | None = None,
        open_image: ImageOpener | None = None,
        progress: ProgressFn | None = None,
        floor: float | None = None,
        heatmap: bool = False,
        heatmap_downsample: float | None = None,
    ) -> SuggestResult:
        """Suggestions per class (and optionally background candidates) on ``image``.

        Prototypes may come from other images (``Prototype.image``): each is embedded on its own
        image, standardised with that image's statistics (this is how noisy patches are mined
        from images the user has not reviewed). ``thresholds`` maps class -> minimum similarity
        (default :data:`DEFAULT_THRESHOLD`); ``patch_size_l0`` (width, height) is the
        experiment's patch size (default: the first prototype's box; with ``settings.dense``
        the default is the median prototype box, and features are pooled over part of it, see
        :class:`SearchSettings`). ``avoid`` boxes (labelled
        patches) are kept out of the background candidates, and so are the suggestions at or
        above their thresholds (patch rule: their boxes; dense rule: their centres, see
        :func:`~simsearch_wsi.search.similarity.background_candidates`). ``open_image`` opens
        the images of prototypes drawn elsewhere (default :func:`simsearch_wsi.io.open_image`).

        ``floor`` (a similarity): also return the candidates between it and a class's threshold,
        ranked with the others, so that a viewer can move the threshold live (see
        :func:`~simsearch_wsi.search.similarity.extract_suggestions`). ``heatmap``: also
        return the class similarity maps on a level-0 aligned grid
        (:func:`~simsearch_wsi.search.heatmap.heatmap_l0`: at least ``heatmap_downsample``
        level-0 pixels per heat-map pixel when given, coarsened to a display cap, never failing
        for its size)."""
        if floor is not None and not -1.0 <= floor <= 1.0:
            raise ConfigError(f"floor must be a similarity in [-1, 1], got {floor}")
        if heatmap_downsample is not None and not (
            math.isfinite(heatmap_downsample) and heatmap_downsample > 0
        ):
            raise ConfigError(f"heat-map downsample must be > 0, got {heatmap_downsample}")
        if not prototypes:
            raise ConfigError("no prototypes given: draw at least one classified rectangle")
        classes = tuple(dict.fromkeys(p.class_name for p in prototypes))
        for name in classes:
            check_class_name(name, label="prototypes")
        thresholds = dict(thresholds or {})
        unknown = set(thresholds) - set(classes)
        if unknown:
            raise ConfigError(
                f"threshold given for unknown class(es) {sorted(unknown)}; classes of the "
                f"prototypes: {list(classes)}"
            )
        used = {c: float(thresholds.get(c, DEFAULT_THRESHOLD)) for c in classes}
        detected: dict[str, list[BoxL0]] = {}  # image path -> objects, found once per image
        mode, why = self.explain_candidates(
            image,
            prototypes,
            normalization=normalization,
            open_image=open_image,
            detected=detected,
        )
        objects = mode == "objects"
        dense = objects or resolve_dense(self.settings.dense, prototypes)
        object_l0 = object_size_l0(prototypes) if dense else None
        if object_l0 is not None:  # pooled over part of the experiment's size (the object's)
            width_l0, height_l0 = (DENSE_POOL_FRACTION * v for v in patch_size_l0 or object_l0)
        elif patch_size_l0 is not None:
            width_l0, height_l0 = patch_size_l0
        else:
            width_l0, height_l0 = prototypes[0].box.width_l0, prototypes[0].box.height_l0
        t0 = time.perf_counter()
        sim = self.similarity(
            image,
            prototypes,
            patch_size_l0=(width_l0, height_l0),
            scale_size_l0=max(object_l0) if object_l0 is not None else None,
            with_mean=bool(n_background),
            normalization=normalization,
            open_image=open_image,
            progress=progress,
        )
        spec, fmap, geometry, maps, here = sim.spec, sim.fmap, sim.geometry, sim.maps, sim.here
        t1 = t0 + sim.seconds_embed
        object_a = None
        if object_l0 is not None:
            _, _, ow_a, oh_a = spec.scale.box_to_analysis(BoxL0(0, 0, *object_l0))
            object_a = (ow_a, oh_a)

        def extract(maps: NDArray[np.float32]) -> list[Suggestion]:
            return extract_suggestions(
                maps,
                classes,
                geometry=geometry,
                spec=spec,
                thresholds=used,
                min_distance_a=(
                    None if dense else self.settings.min_distance_fraction * geometry.width_a
                ),
                max_per_class=self.settings.max_per_class,
                exclude=here,
                image_size_l0=image.dimensions,
                object_size_a=object_a,
                floor=floor,
            )

        found: ObjectCandidates | None = None
        object_vectors: tuple[torch.Tensor, torch.Tensor] | None = None
        if objects:
            found = self._object_candidates(
                image,
                prototypes,
                spec=spec,
                fmap=fmap,
                classes=classes,
                open_image=open_image,
                detected=detected,
            )
            object_vectors = (found.vectors, found.class_index)
            suggestions = found.suggestions(
                object_vectors,
                thresholds=used,
                floor=floor,
                exclude=here,
                max_per_class=self.settings.max_per_class,
            )
        else:
            suggestions = extract(maps)
        # query expansion: the best hits on this image join the prototypes (second pass); only
        # suggestions at or above their class's threshold, never the floor's candidates
        hits = [
            Prototype(s.class_name, s.box, image=None)
            for c in classes
            for s in sorted(
                (g for g in above_thresholds(suggestions, used) if g.class_name == c),
                key=lambda g: -g.similarity,
            )[: self.settings.expand]
        ]
        if hits and found is not None:
            object_vectors = found.expanded(hits)
            suggestions = found.suggestions(
                object_vectors,
                thresholds=used,
                floor=floor,
                exclude=here,
                max_per_class=self.settings.max_per_class,
            )
        elif hits:
            sim = self.similarity(
                image,
                [*prototypes, *hits],
                patch_size_l0=(width_l0, height_l0),
                scale_size_l0=max(object_l0) if object_l0 is not None else None,
                with_mean=bool(n_background),
                normalization=normalization,
                open_image=open_image,
            )
            maps = sim.maps
            suggestions = extract(maps)
        background: list[Suggestion] = []
        if n_background:
            # the floor's candidates are not suggestions: they leave the background alone
            shown = above_thresholds(suggestions, used)
            labelled = [p.box for p in here] + list(avoid)
            background = background_candidates(
                maps[len(classes)],
                geometry,
                spec=spec,
                n_high=n_background,
                n_low=n_background,
                avoid=labelled if object_a is not None else labelled + [s.box for s in shown],
                avoid_centres_l0=[s.box.center_l0 for s in shown] if object_a is not None else (),
                image_size_l0=image.dimensions,
                object_size_a=object_a,
            )
        t2 = time.perf_counter()
        notes = []
        if why:
            notes.append(
                f"candidates auto: {'object candidates' if objects else 'the grid'}, {why}"
            )
        if hits:
            notes.append(
                f"query expansion: {len(hits)} first-pass suggestion(s) at or above the "
                f"thresholds (up to {self.settings.expand} per class) joined the prototypes"
            )
        if found is not None:
            notes.append(
                f"object candidates: {len(found.boxes)} object(s) found, each compared at its "
                "own size"
            )
        if object_l0 is not None:
            notes.append(
                f"dense objects: object size {object_l0[0]:.0f}x{object_l0[1]:.0f} px (median "
                f"prototype box), features pooled over {width_l0:.0f}x{height_l0:.0f} px"
            )
        elif any(
            abs(p.box.width_l0 - width_l0) > 1 or abs(p.box.height_l0 - height_l0) > 1
            for p in prototypes
        ):
            notes.append(
                f"prototypes differ in size: the experiment's patch size is {width_l0:.0f}x"
                f"{height_l0:.0f} px; others are used at that size, centred on their box"
            )
        return SuggestResult(
            image=str(image.path),
            classes=classes,
            thresholds=used,
            suggestions=suggestions,
            background=background,
            scale=spec.scale,
            geometry=geometry,
            feature_cache=str(fmap.path),
            weights=self.extractor.weights.description,
            seconds_embed=t1 - t0,
            seconds_query=t2 - t1,
            feature_norm=self.settings.feature_norm,
            notes=notes,
            object_size_l0=object_l0,
            floor=floor,
            expand=self.settings.expand,
            candidates=mode,
            heatmap=(
                heatmap_l0(
                    # object candidates: the objects' own similarities, the suggestions' scale
                    maps
                    if found is None or object_vectors is None
                    else found.similarity_maps(
                        object_vectors,
                        geometry=geometry,
                        scale=spec.scale,
                        shape_hw=(maps.shape[1], maps.shape[2]),
                    ),
                    classes,
                    geometry=geometry,
                    spec=spec,
                    image_size_l0=image.dimensions,
                    downsample=heatmap_downsample,
                    mpp=image.mpp,
                )
                if heatmap
                else None
            ),
        )

    def similarity(
        self,
        image: ImageSource,
        prototypes: Sequence[Prototype],
        *,
        patch_size_l0: tuple[float, float],
        scale_size_l0: float | None = None,
        with_mean: bool = False,
        normalization: ChannelNormalization | None = None,
        open_image: ImageOpener | None = None,
        progress: ProgressFn | None = None,
    ) -> SimilarityMaps:
        """Per-class similarity maps of ``image`` (embedding it if not cached): ``maps`` is
        (K [+1], H', W') over pooled windows (NaN where not embedded), the extra last map (with
        ``with_mean``) being the similarity to the mean of all prototype vectors.
        ``scale_size_l0`` (level-0 px) sets the analysis scale (default: the patch's longer
        side; dense objects: the object's)."""
        classes = tuple(dict.fromkeys(p.class_name for p in prototypes))
        width_l0, height_l0 = patch_size_l0
        patch_l0 = scale_size_l0 or max(width_l0, height_l0)
        t0 = time.perf_counter()
        spec, fmap = self.embed(image, patch_l0, normalization=normalization, progress=progress)
        seconds_embed = time.perf_counter() - t0
        geometry = PatchGeometry.from_l0(
            width_l0, height_l0, scale=spec.scale, stride=self.extractor.stride
        )
        here = [p for p in prototypes if _same_image(p.image, image)]
        for p in here:
            check_box(
                p.box,
                label=f"prototype ({p.class_name}) on {image.path}",
                image_size_l0=image.dimensions,
            )
        parts = []
        if here:
            normalizer = FeatureNormalizer.of(fmap, self.settings.feature_norm)
            parts.append(
                embed_prototypes(
                    image,
                    self.extractor,
                    spec=spec,
                    geometry=geometry,
                    prototypes=here,
                    classes=classes,
                    normalizer=normalizer,
                )
            )
        parts += self._foreign_prototype_vectors(
            image, prototypes, classes, patch_l0, geometry, open_image, progress
        )
        vectors = PrototypeVectors(
            torch.cat([p.vectors for p in parts]),
            torch.cat([p.class_index for p in parts]),
            classes,
        )
        extra = vectors.mean_vector()[None] if with_mean else None
        maps = similarity_maps(
            fmap, geometry, prototypes=vectors, extra_vectors=extra, norm=self.settings.feature_norm
        )
        return SimilarityMaps(spec, fmap, geometry, classes, maps, here, seconds_embed)

    def resolve_candidates(
        self,
        image: ImageSource,
        prototypes: Sequence[Prototype],
        *,
        normalization: ChannelNormalization | None = None,
        open_image: ImageOpener | None = None,
    ) -> str:
        """``"grid"`` or ``"objects"``: ``settings.candidates``, with ``"auto"`` resolved
        (:meth:`explain_candidates` says why).
        ``"auto"`` (never with ``dense=False`` or ``dense_fine``) is ``"objects"`` when the
        prototypes outline separate objects: every prototype box holds the centre of an object found
        on its image (:func:`~simsearch_wsi.search.objects.find_objects`) whose longer side is
        within :data:`~simsearch_wsi.search.objects.AUTO_OBJECT_SIZE_RATIO` times the box's, no two
        boxes the same object, and on each prototype image and ``image`` at least
        :data:`~simsearch_wsi.search.objects.AUTO_MIN_COVERAGE` of the foreground lies in objects of
        the prototypes' size range (crowded nuclei, touching cells and tissue give merged clumps or
        parts; measured in docs/evaluation.md). An image too large to be read whole for that
        (:data:`~simsearch_wsi.search.objects.AUTO_MAX_PIXELS`, e.g. a slide;
        :func:`~simsearch_wsi.search.objects.detection_fits`), or without the pyramid levels to
        detect the prototypes' objects, takes the grid."""
        return self.explain_candidates(
            image, prototypes, normalization=normalization, open_image=open_image
        )[0]

    def explain_candidates(
        self,
        image: ImageSource,
        prototypes: Sequence[Prototype],
        *,
        normalization: ChannelNormalization | None = None,
        open_image: ImageOpener | None = None,
        detected: dict[str, list[BoxL0]] | None = None,
    ) -> tuple[str, str]:
        """:meth:`resolve_candidates`'s answer and, for ``"auto"``, why (a sentence for the
        user; empty when the candidates were asked for by name). ``detected``, when given,
        receives the objects found on each image looked at (by path), for the object
        candidates to reuse."""
        from simsearch_wsi.io import open_image as open_any

        mode = self.settings.candidates
        if mode != "auto":
            return mode, ""
        if self.settings.dense is False or self.settings.dense_fine or not prototypes:
            rule = "the patch rule" if self.settings.dense is False else "--dense-fine"
            return "grid", f"with {rule} (object candidates need the object rule)"
        sides = [max(p.box.width_l0, p.box.height_l0) for p in prototypes]
        patch_l0 = max(object_size_l0(prototypes))
        by_image: dict[str | None, list[Prototype]] = {None: []}
        for p in prototypes:
            key = None if _same_image(p.image, image) else str(p.image)
            by_image.setdefault(key, []).append(p)
        for path, protos in by_image.items():
            with nullcontext(image) if path is None else (open_image or open_any)(path) as src:
                where = "the image" if path is None else f"prototype image {os.path.basename(path)}"
                try:
                    scale = object_rule.detection_scale(src, min(sides))
                except ConfigError as err:  # e.g. too large without more pyramid levels
                    return "grid", f"objects cannot be found on {where} ({err})"
                if not object_rule.detection_fits(src, scale, object_rule.AUTO_MAX_PIXELS):
                    return "grid", f"{where} is too large to be read whole (a slide)"
                spec = self.feature_spec(
                    src, patch_l0, normalization=normalization if path is None else None
                )
                found, coverage = find_objects(
                    src,
                    normalization=spec.normalization,
                    channels=spec.channels,
                    rgb=src.is_brightfield,  # dark objects, whatever channels are read
                    size_range_l0=(min(sides), max(sides)),
                )
                if detected is not None:
                    detected[str(src.path)] = found
            if coverage < object_rule.AUTO_MIN_COVERAGE:
                return "grid", (
                    f"on {where} {coverage:.0%} of the foreground is separate objects of the "
                    f"prototypes' size (needs {object_rule.AUTO_MIN_COVERAGE:.0%})"
                )
            if not object_rule.outline_objects([p.box for p in protos], found):
                return "grid", f"the prototype boxes on {where} do not each outline one object"
        return "objects", "the prototype boxes outline separate objects"

    def _object_candidates(
        self,
        image: ImageSource,
        prototypes: Sequence[Prototype],
        *,
        spec: FeatureSpec,
        fmap: FeatureMap,
        classes: tuple[str, ...],
        open_image: ImageOpener | None,
        detected: dict[str, list[BoxL0]],
    ) -> ObjectCandidates:
        """Object candidates of ``image`` (``settings.candidates == "objects"``): its objects,
        their vectors and the prototypes' (each embedded on its own image, over the object its
        box outlines; :mod:`simsearch_wsi.search.objects`). ``detected``: objects already found
        per image path (by ``auto``'s decision, with the same sizes); the others are found here
        and added."""
        from simsearch_wsi.io import open_image as open_any

        sides = [max(p.box.width_l0, p.box.height_l0) for p in prototypes]
        size_range = (min(sides), max(sides))
        norm = object_rule.OBJECT_FEATURE_NORM.get(
            self.settings.feature_norm, self.settings.feature_norm
        )
        patch_l0 = max(object_size_l0(prototypes))

        def objects_of(src: ImageSource, spec: FeatureSpec) -> list[BoxL0]:
            key = str(src.path)
            if key not in detected:
                detected[key] = detect_objects(
                    src,
                    normalization=spec.normalization,
                    channels=spec.channels,
                    rgb=src.is_brightfield,  # as explain_candidates
                    size_range_l0=size_range,
                )
            return detected[key]

        def vectors_of(
            src: ImageSource, spec: FeatureSpec, fmap: FeatureMap, protos: list[Prototype]
        ) -> tuple[torch.Tensor, list[int]]:
            normalizer = FeatureNormalizer.of(fmap, norm)
            boxes = snap_to_objects([p.box for p in protos], objects_of(src, spec))
            vecs = embed_boxes(
                src,
                self.extractor,
                spec=spec,
                boxes=boxes,
                normalizer=normalizer,
                pool_fraction=object_rule.OBJECT_POOL_FRACTION,
                rotations=4,
                batch_size=self.settings.batch_size,
            )
            return vecs, [classes.index(p.class_name) for p in protos for _ in range(4)]

        boxes = objects_of(image, spec)
        candidate_vectors = embed_boxes(
            image,
            self.extractor,
            spec=spec,
            boxes=boxes,
            normalizer=FeatureNormalizer.of(fmap, norm),
            pool_fraction=object_rule.OBJECT_POOL_FRACTION,
            batch_size=self.settings.batch_size,
        )
        by_image: dict[str | None, list[Prototype]] = {}
        for p in prototypes:
            key = None if _same_image(p.image, image) else str(p.image)
            by_image.setdefault(key, []).append(p)
        parts: list[torch.Tensor] = []
        owners: list[int] = []
        for path, protos in by_image.items():
            if path is None:
                vecs, own = vectors_of(image, spec, fmap, protos)
            else:
                with (open_image or open_any)(path) as src:
                    other_spec, other_fmap = self.embed(src, patch_l0)
                    vecs, own = vectors_of(src, other_spec, other_fmap, protos)
            parts.append(vecs)
            owners += own
        return ObjectCandidates(
            tuple(boxes),
            candidate_vectors,
            torch.cat(parts),
            torch.tensor(owners, dtype=torch.long),
            classes,
        )

    def _foreign_prototype_vectors(
        self,
        image: ImageSource,
        prototypes: Sequence[Prototype],
        classes: tuple[str, ...],
        patch_l0: float,
        geometry: PatchGeometry,
        open_image: ImageOpener | None,
        progress: ProgressFn | None,
    ) -> list[PrototypeVectors]:
        """Vectors of prototypes drawn on other images, each embedded on its own image."""
        from simsearch_wsi.io import open_image as open_any

        opener: ImageOpener = open_image or open_any
        by_image: dict[str, list[Prototype]] = {}
        for p in prototypes:
            if not _same_image(p.image, image):
                by_image.setdefault(str(p.image), []).append(p)
        parts = []
        for path, protos in by_image.items():
            with opener(path) as src:
                for p in protos:
                    check_box(
                        p.box,
                        label=f"prototype ({p.class_name}) on {path}",
                        image_size_l0=src.dimensions,
                    )
                spec, fmap = self.embed(src, patch_l0, progress=progress)
                normalizer = FeatureNormalizer.of(fmap, self.settings.feature_norm)
                parts.append(
                    embed_prototypes(
                        src,
                        self.extractor,
                        spec=spec,
                        geometry=geometry,
                        prototypes=protos,
                        classes=classes,
                        normalizer=normalizer,
                    )
                )
        return parts


def above_thresholds(
    suggestions: Sequence[Suggestion], thresholds: dict[str, float]
) -> list[Suggestion]:
    """The suggestions at or above their class's threshold (``>=``; without a ``floor`` that
    is all of them)."""
    return [s for s in suggestions if s.similarity >= thresholds[s.class_name]]


def resolve_dense(mode: bool | str, prototypes: Sequence[Prototype]) -> bool:
    """Whether the dense rule applies (:class:`SearchSettings` ``dense``): ``True``/``False`` as
    given; ``"auto"``: when every prototype box's longest side is at most
    :data:`AUTO_DENSE_SIZE_RATIO` times the shortest box side of them all (objects of one size,
    whose median box is a fair object size)."""
    if mode != "auto":
        return bool(mode)
    if not prototypes:
        raise ConfigError("no prototypes given: draw at least one classified rectangle")
    longest = max(max(p.box.width_l0, p.box.height_l0) for p in prototypes)
    shortest = min(min(p.box.width_l0, p.box.height_l0) for p in prototypes)
    return longest <= AUTO_DENSE_SIZE_RATIO * shortest


def object_size_l0(prototypes: Sequence[Prototype]) -> tuple[float, float]:
    """(width, height) in level-0 px of the objects the prototypes outline: their median box."""
    if not prototypes:
        raise ConfigError("no prototypes given: draw at least one classified rectangle")
    return (
        float(np.median([p.box.width_l0 for p in prototypes])),
        float(np.median([p.box.height_l0 for p in prototypes])),
    )


def _same_image(prototype_image: str | None, image: ImageSource) -> bool:
    if prototype_image is None:
        return True
    from pathlib import Path

    return Path(prototype_image).resolve() == image.path.resolve()
