"""The trained-model artifact: one versioned, self-describing file.

A model bundle is a zip archive (members stored uncompressed) holding

* ``bundle.json``: human-readable metadata: ``"format": "simsearch-wsi-model"``, ``"version"``,
  the backbone name, classes with colours and thresholds, the patch size (level-0 pixels and
  micrometres), analysis scale, context, pooling geometry, channel normalisation, channels,
  training strategy, config and metrics, provenance, library versions, creation time and
  ``"weights_sha256"``, the sha256 of the ``weights.pt`` member;
* ``weights.pt``: a :func:`torch.save` of a flat dict of tensors: the trunk's state dict with
  keys prefixed ``trunk.``, and the linear head as ``head.weight`` (K, D) and ``head.bias`` (K,).

:func:`save_bundle` writes it atomically; :func:`load_bundle` reads it back with one reader per
format version (see ``_READERS``) and fails with a one-line :class:`BundleError` that names the
file and says what to do when the file is missing, truncated, corrupt, of another format or of a
newer version. :meth:`ModelBundle.build_trunk` and :meth:`ModelBundle.head` rebuild the modules.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import numbers
import operator
import os
import platform
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simsearch_wsi.core.atomic import atomic_path
from simsearch_wsi.core.errors import ConfigError, MetadataError, SimSearchError
from simsearch_wsi.features.backbones import BackboneSpec, available_backbones, get_backbone_spec
from simsearch_wsi.features.norm import check_feature_norm
from simsearch_wsi.features.preprocess import ChannelNormalization

BUNDLE_FORMAT = "simsearch-wsi-model"
#: the newest format version this release reads and writes; a bundle without a ``partner``
#: is still written as version 2 and one whose partner has no similarity expert as version 3,
#: so that older releases read them
BUNDLE_VERSION = 4
#: the version of a bundle without a partner model
_PLAIN_VERSION = 2
#: the version of a bundle with a partner model without a similarity expert
_PARTNER_VERSION = 3
#: what a head reads: pooled features of the bundle's trunk, or the search's normalised vectors
HEAD_INPUTS = ("trunk", "search")

METADATA_MEMBER = "bundle.json"
WEIGHTS_MEMBER = "weights.pt"
TRUNK_PREFIX = "trunk."
HEAD_WEIGHT_KEY = "head.weight"
HEAD_BIAS_KEY = "head.bias"
MEMORY_VECTORS_KEY = "memory.vectors"
MEMORY_OWNER_KEY = "memory.owner"
EXPERT_MASK_KEY = "expert.mask"
EXPERT_WEIGHT_KEY = "expert.weight"
EXPERT_BIAS_KEY = "expert.bias"
#: the partner model's tensors in weights.pt carry this prefix before their own keys
PARTNER_PREFIX = "partner."

_TRAIN_HINT = "train one with `simsearch-wsi train`"
_COPY_HINT = "copy the file again or re-train"
#: a similarity expert is read from an ensemble's partner only (``infer.dense``)
_LONE_EXPERT = (
    "a similarity expert without a partner model (only an ensemble's partner has one; "
    "predict would ignore it)"
)
# zip entries get a fixed timestamp so that equal bundles are byte-identical files
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


class BundleError(SimSearchError, ValueError):
    """A model bundle is corrupt, incompatible or incomplete."""


class BundleNotFoundError(BundleError, FileNotFoundError):
    """A model bundle path does not exist."""


# --- validation helpers (messages say what to fix) --------------------------------------------
def _positive_finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BundleError(f"{name} must be a number, got {value!r}")
    out = float(value)
    if not (math.isfinite(out) and out > 0):
        raise BundleError(f"{name} must be a finite number > 0, got {value!r}")
    return out


def _integer(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool):
        raise BundleError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise BundleError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if out < minimum:
        raise BundleError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return out


def _names(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise BundleError(f"{name} must be a sequence of names, got {value!r}")
    out = tuple(value)
    bad = [v for v in out if not isinstance(v, str) or not v.strip()]
    if bad or not out:
        raise BundleError(f"{name} must be one or more non-empty strings, got {list(out)!r}")
    duplicates = sorted({v for v in out if out.count(v) > 1})
    if duplicates:
        raise BundleError(f"{name} must be unique; {duplicates} appear more than once")
    return out


def _json_dict(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise BundleError(f"{name} must be a dict with string keys, got {type(value).__name__}")
    out = dict(value)
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BundleError(
            f"{name} must be JSON-serialisable ({exc}); use plain str/int/float/bool/None, "
            "lists and dicts, and None instead of NaN or infinity"
        ) from None
    return out


def _tensor(name: str, value: Any, ndim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise BundleError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != ndim or not value.is_floating_point():
        raise BundleError(
            f"{name} must be a {ndim}-D floating-point tensor, got shape {tuple(value.shape)} "
            f"and dtype {value.dtype}"
        )
    if not bool(torch.isfinite(value).all()):
        raise BundleError(f"{name} contains NaN or infinite values; the training diverged")
    return value


def _colour(name: str, value: Any) -> tuple[int, int, int]:
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 3
    if ok:
        try:
            rgb = tuple(operator.index(v) for v in value if not isinstance(v, bool))
        except TypeError:
            rgb = ()
        ok = len(rgb) == 3 and all(0 <= v <= 255 for v in rgb)
    if not ok:
        raise BundleError(
            f"colors[{name!r}] must be 3 integers 0-255 (R, G, B), e.g. (255, 0, 0), got {value!r}"
        )
    return (rgb[0], rgb[1], rgb[2])


@dataclass(frozen=True, eq=False, repr=False)
class ModelBundle:
    """A trained patch classifier: trunk weights, linear head and everything needed to apply it.

    Attributes
    ----------
    backbone
        registered backbone name (:func:`simsearch_wsi.features.backbones.available_backbones`).
    trunk_state
        the trained trunk's state dict (keys without the ``trunk.`` prefix).
    head_weight, head_bias
        ``trunk`` head: (K, D) and (K,) linear classifier on pooled trunk features. ``search``
        head: (K, 2) weights of the similarity to the class and to its counter-examples, and
        (K,) biases, of :class:`simsearch_wsi.search.probe.MemoryHead`.
    memory_vectors, memory_owner
        ``search`` head only: the memory, (M, D) unit window vectors and (M,) owners (``k`` =
        a positive of class ``k``, ``K + k`` = rejected for class ``k``).
    classes
        K class names in head output order (may include ``"background"``).
    colors
        RGB 0-255 display colour per class (QuPath path classes); a subset of ``classes``.
    thresholds
        per-class softmax confidence threshold in [0, 1]; a subset of ``classes``.
    patch_size_l0
        (width, height) of a patch in level-0 pixels of the training images.
    mpp
        level-0 micrometres per pixel of the training images; ``None`` if unknown.
    analysis_downsample
        level-0 pixels per analysis pixel used in training.
    context_a
        analysis pixels of context read around each patch window in training.
    geometry
        :meth:`simsearch_wsi.search.similarity.PatchGeometry.to_dict`: ``width_a``, ``height_a``
        (analysis pixels) and ``stride`` (analysis pixels per feature cell).
    normalization
        :meth:`simsearch_wsi.features.preprocess.ChannelNormalization.to_dict`.
    channels
        channel names used, in order.
    rgb
        brightfield RGB goes through the trunk as RGB.
    strategy
        training strategy, e.g. ``"pos+neg+selflearn"``.
    head_input
        what the head reads (format version 2; version 1 bundles are ``"trunk"``):
        ``"trunk"`` = the Gaussian-pooled features of the trunk with ``context_a`` (the
        fine-tuned model); ``"search"`` = the similarity search's unit window vectors,
        normalised per image with ``feature_norm`` (the search head,
        :mod:`simsearch_wsi.search.probe`; the trunk is then the search's, unchanged).
    feature_norm
        the feature normalisation of a ``"search"`` head (``"none"`` for ``"trunk"``).
    config, metrics, provenance
        JSON-able training config, training metrics, and provenance (weights identity,
        session, images).
    versions
        library versions; :func:`save_bundle` fills them when empty.
    created
        ISO 8601 UTC creation time; :func:`save_bundle` fills it when empty.
    partner
        format version 3: a second ``"search"`` head on the search's own (unchanged) trunk,
        with the same classes and patch size, whose class probabilities are combined with
        this bundle's per window (the mean of the two log-probabilities, renormalised over
        the classes: a product of experts; :func:`simsearch_wsi.train.ensemble.combine_experts`).
        ``train --head-input ensemble`` makes one: the search head on the fine-tuned trunk
        (this bundle) and on the search's trunk (the partner). ``None``: one model.
    expert_mask, expert_weight, expert_bias, expert_share
        format version 4, a ``"search"`` head only (a partner): the *similarity expert*, a
        third expert of the product: the search's similarity to the prototypes, as class
        probabilities. ``expert_mask`` (M,) bool picks the memory entries it remembers (the
        user's prototypes); ``expert_weight`` (K, 2) and ``expert_bias`` (K,) its logits as
        ``head_weight`` and ``head_bias`` are the head's; ``expert_share`` (> 0) its weight in
        the product (the two heads weigh 1 each). All ``None`` (and share 0): no expert.
    source
        the file the bundle was loaded from (``None`` for a bundle built in memory); not saved.

    Notes
    -----
    Instances compare by identity (tensors have no single truth value); compare fields and
    tensors (``torch.equal``) to test two bundles for equality.
    """

    backbone: str
    trunk_state: dict[str, torch.Tensor]
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    classes: tuple[str, ...]
    colors: dict[str, tuple[int, int, int]]
    thresholds: dict[str, float]
    patch_size_l0: tuple[float, float]
    mpp: float | None
    analysis_downsample: float
    context_a: int
    geometry: dict[str, Any]
    normalization: dict[str, Any]
    channels: tuple[str, ...]
    rgb: bool
    strategy: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    head_input: str = "trunk"
    feature_norm: str = "none"
    memory_vectors: torch.Tensor | None = None
    memory_owner: torch.Tensor | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    partner: ModelBundle | None = None
    expert_mask: torch.Tensor | None = None
    expert_weight: torch.Tensor | None = None
    expert_bias: torch.Tensor | None = None
    expert_share: float = 0.0
    source: Path | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if not isinstance(self.backbone, str) or not self.backbone.strip():
            raise BundleError(f"backbone must be a registered backbone name, got {self.backbone!r}")
        state = self.trunk_state
        if not isinstance(state, Mapping) or not state:
            raise BundleError("trunk_state must be a non-empty state dict of the trained trunk")
        bad_keys = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
        if bad_keys:
            raise BundleError(
                f"trunk_state must map parameter names to tensors; bad entries {bad_keys[:3]}; "
                "pass trunk.state_dict()"
            )
        put("trunk_state", dict(state))
        weight = _tensor("head_weight", self.head_weight, 2)
        bias = _tensor("head_bias", self.head_bias, 1)
        classes = _names("classes", self.classes)
        put("classes", classes)
        k = len(classes)
        if weight.shape[0] != k or bias.shape[0] != k:
            raise BundleError(
                f"the head has {weight.shape[0]} outputs (head_weight {tuple(weight.shape)}, "
                f"head_bias {tuple(bias.shape)}) but there are {k} classes {list(classes)}; "
                "give one class name per head output, in output order"
            )
        if weight.shape[1] < 1:
            raise BundleError("head_weight must have at least one input feature (D >= 1)")

        for what, mapping in (("colors", self.colors), ("thresholds", self.thresholds)):
            if not isinstance(mapping, Mapping):
                raise BundleError(f"{what} must be a dict keyed by class name, got {mapping!r}")
            unknown = sorted(str(c) for c in mapping if c not in classes)
            if unknown:
                raise BundleError(
                    f"{what} name classes {unknown} that are not among the bundle's classes "
                    f"{list(classes)}; remove them or fix the class names"
                )
        put("colors", {c: _colour(c, v) for c, v in self.colors.items()})
        thresholds: dict[str, float] = {}
        for c, v in self.thresholds.items():
            ok = not isinstance(v, bool) and isinstance(v, numbers.Real)
            if not ok or not math.isfinite(float(v)) or not 0.0 <= float(v) <= 1.0:
                raise BundleError(
                    f"thresholds[{c!r}] = {v!r} is not a softmax confidence; use a number in [0, 1]"
                )
            thresholds[c] = float(v)
        put("thresholds", thresholds)

        raw_size: Any = self.patch_size_l0
        try:
            size = () if isinstance(raw_size, str) else tuple(raw_size)
        except TypeError:
            size = ()
        if len(size) != 2:
            raise BundleError(
                f"patch_size_l0 must be (width, height) in level-0 px, got {raw_size!r}"
            )
        put(
            "patch_size_l0",
            (
                _positive_finite("patch_size_l0 width", size[0]),
                _positive_finite("patch_size_l0 height", size[1]),
            ),
        )
        if self.mpp is not None:
            put("mpp", _positive_finite("mpp (level-0 um/px; None if unknown)", self.mpp))
        put(
            "analysis_downsample", _positive_finite("analysis_downsample", self.analysis_downsample)
        )
        put("context_a", _integer("context_a (analysis px)", self.context_a, minimum=0))

        geometry = _json_dict("geometry", self.geometry)
        missing = [g for g in ("width_a", "height_a", "stride") if g not in geometry]
        if missing:
            raise BundleError(
                f"geometry lacks {missing}; pass PatchGeometry.to_dict() (width_a, height_a, "
                "stride)"
            )
        _positive_finite("geometry width_a", geometry["width_a"])
        _positive_finite("geometry height_a", geometry["height_a"])
        _integer("geometry stride", geometry["stride"], minimum=1)
        put("geometry", geometry)
        normalization = _json_dict("normalization", self.normalization)
        try:
            ChannelNormalization.from_dict(normalization)
        except (MetadataError, ConfigError) as exc:
            raise BundleError(
                f"normalization is not a ChannelNormalization.to_dict(): {exc}"
            ) from None
        put("normalization", normalization)
        put("channels", _names("channels", self.channels))
        if not isinstance(self.rgb, bool):
            raise BundleError(f"rgb must be True or False, got {self.rgb!r}")
        if not isinstance(self.strategy, str):
            raise BundleError(f"strategy must be a string, got {self.strategy!r}")
        if self.head_input not in HEAD_INPUTS:
            raise BundleError(
                f"head_input must be one of {', '.join(HEAD_INPUTS)}, got {self.head_input!r}"
            )
        try:
            check_feature_norm(self.feature_norm)
        except ConfigError as exc:
            raise BundleError(str(exc)) from None
        if self.head_input == "search":
            if self.memory_vectors is None or self.memory_owner is None:
                raise BundleError("a 'search' head needs memory_vectors and memory_owner")
            vectors = _tensor("memory_vectors", self.memory_vectors, 2)
            owner = self.memory_owner
            if (
                not torch.is_tensor(owner)
                or owner.ndim != 1
                or len(owner) != len(vectors)
                or owner.dtype != torch.int64
            ):
                raise BundleError(
                    f"memory_owner must be an (M,) int64 tensor for the (M, D) memory_vectors "
                    f"{tuple(vectors.shape)}"
                )
            if len(owner) and (int(owner.min()) < 0 or int(owner.max()) >= 2 * k):
                raise BundleError(f"memory_owner values must lie in [0, {2 * k})")
            if weight.shape[1] != 2:
                raise BundleError(
                    f"a 'search' head's head_weight is (K, 2) similarity weights, got "
                    f"{tuple(weight.shape)}"
                )
        elif self.memory_vectors is not None or self.memory_owner is not None:
            raise BundleError("only a 'search' head has a memory (memory_vectors, memory_owner)")
        self._check_expert(k)
        put("config", _json_dict("config", self.config))
        put("metrics", _json_dict("metrics", self.metrics))
        put("provenance", _json_dict("provenance", self.provenance))
        versions = _json_dict("versions", self.versions)
        if not all(isinstance(v, str) for v in versions.values()):
            raise BundleError(f"versions must map package names to version strings: {versions}")
        put("versions", versions)
        if not isinstance(self.created, str):
            raise BundleError(f"created must be an ISO 8601 time string, got {self.created!r}")
        if self.partner is not None:
            other = self.partner
            if not isinstance(other, ModelBundle):
                raise BundleError(f"partner must be a ModelBundle or None, got {other!r}")
            if other.partner is not None or other.head_input != "search":
                raise BundleError(
                    "a partner model is one 'search' head without a partner of its own"
                )
            if self.has_expert:
                # predict reads the expert from the partner only; here it would be ignored
                raise BundleError(
                    "a similarity expert is the partner's (it reads the search's trunk), not "
                    "the model's that has the partner"
                )
            if other.classes != classes or other.patch_size_l0 != self.patch_size_l0:
                raise BundleError(
                    f"the partner model must have the same classes and patch size "
                    f"({list(other.classes)}, {other.patch_size_l0} vs {list(classes)}, "
                    f"{self.patch_size_l0})"
                )
            # what decides the window grid and the pixels both models read: with any of these
            # different the two maps would not score the same windows
            differ = [
                f"{name} {getattr(other, name)!r} vs {getattr(self, name)!r}"
                for name in ("backbone", "channels", "rgb", "mpp")
                if getattr(other, name) != getattr(self, name)
            ]
            if differ:
                raise BundleError(
                    f"the partner model would score other windows than the model "
                    f"({'; '.join(differ)}: partner vs model); pair models trained on one session"
                )
        if self.source is not None:
            put("source", Path(self.source))

    def _check_expert(self, k: int) -> None:
        """The similarity expert's fields: all or none, on a ``search`` head's memory."""
        fields = (self.expert_mask, self.expert_weight, self.expert_bias)
        share = self.expert_share
        if isinstance(share, bool) or not isinstance(share, numbers.Real):
            raise BundleError(f"expert_share must be a number, got {share!r}")
        if all(f is None for f in fields):
            if float(share) != 0.0:
                raise BundleError("expert_share is set but the bundle has no similarity expert")
            object.__setattr__(self, "expert_share", 0.0)
            return
        if any(f is None for f in fields):
            raise BundleError(
                "a similarity expert needs expert_mask, expert_weight and expert_bias together"
            )
        if self.head_input != "search" or self.memory_vectors is None:
            raise BundleError("only a 'search' head has a similarity expert (it reads the memory)")
        mask = self.expert_mask
        assert mask is not None
        if (
            not torch.is_tensor(mask)
            or mask.dtype != torch.bool
            or mask.shape != (len(self.memory_vectors),)
        ):
            raise BundleError(
                f"expert_mask must be an (M,) bool tensor for the (M, D) memory_vectors "
                f"{tuple(self.memory_vectors.shape)}"
            )
        weight = _tensor("expert_weight", self.expert_weight, 2)
        bias = _tensor("expert_bias", self.expert_bias, 1)
        if weight.shape != (k, 2) or bias.shape != (k,):
            raise BundleError(
                f"expert_weight must be ({k}, 2) and expert_bias ({k},), got "
                f"{tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        if not bool(mask.any()):
            raise BundleError(
                "expert_mask picks no memory entry; the similarity expert remembers the "
                "prototypes' entries"
            )
        if not (math.isfinite(float(share)) and float(share) > 0):
            raise BundleError(f"expert_share must be > 0 with a similarity expert, got {share}")
        object.__setattr__(self, "expert_share", float(share))

    def _partner_summary(self) -> dict[str, Any]:
        """What :meth:`describe` says of this model as a partner (its similarity expert's share
        where it has one)."""
        out: dict[str, Any] = {"head_input": self.head_input, "feature_dim": self.feature_dim}
        if self.has_expert:
            out["similarity_expert"] = self.expert_share
        return out

    @property
    def has_expert(self) -> bool:
        """Whether this model carries a similarity expert (format version 4)."""
        return self.expert_mask is not None

    def format_version(self) -> int:
        """The format version this bundle is written as: the oldest that holds it."""
        if self.has_expert or (self.partner is not None and self.partner.has_expert):
            return BUNDLE_VERSION
        return _PLAIN_VERSION if self.partner is None else _PARTNER_VERSION

    def __repr__(self) -> str:
        return (
            f"ModelBundle(backbone={self.backbone!r}, classes={self.classes!r}, "
            f"feature_dim={self.feature_dim}, patch_size_l0={self.patch_size_l0!r}, "
            f"mpp={self.mpp!r}, created={self.created!r}, source={self.source!r})"
        )

    # --- derived quantities -----------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        """K, the number of head outputs."""
        return len(self.classes)

    @property
    def feature_dim(self) -> int:
        """D, the dimension of the vectors the head takes (pooled trunk features, or the
        search's window vectors)."""
        if self.memory_vectors is not None:
            return int(self.memory_vectors.shape[1])
        return int(self.head_weight.shape[1])

    @property
    def patch_size_um(self) -> tuple[float, float] | None:
        """(width, height) of a patch in micrometres; ``None`` when ``mpp`` is unknown."""
        if self.mpp is None:
            return None
        return (self.patch_size_l0[0] * self.mpp, self.patch_size_l0[1] * self.mpp)

    @property
    def analysis_mpp(self) -> float | None:
        """Micrometres per analysis pixel (``mpp * analysis_downsample``); ``None`` if unknown."""
        return None if self.mpp is None else self.mpp * self.analysis_downsample

    def channel_normalization(self) -> ChannelNormalization:
        """The training images' channel normalisation as an object."""
        return ChannelNormalization.from_dict(self.normalization)

    # --- serialisation ----------------------------------------------------------------------
    def to_json_dict(self, *, weights_sha256: str | None = None) -> dict[str, Any]:
        """The ``bundle.json`` content: every field except the tensors (and ``source``).

        ``weights_sha256`` (the sha256 of the ``weights.pt`` member, known once the weights are
        serialised) is included when given; :func:`save_bundle` always gives it.
        """
        out: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "version": self.format_version(),
            "backbone": self.backbone,
            "classes": list(self.classes),
            "colors": {c: list(rgb) for c, rgb in self.colors.items()},
            "thresholds": dict(self.thresholds),
            "n_classes": self.n_classes,
            "feature_dim": self.feature_dim,
            "patch_size_l0": list(self.patch_size_l0),
            "patch_size_um": None if self.patch_size_um is None else list(self.patch_size_um),
            "mpp": self.mpp,
            "analysis_downsample": self.analysis_downsample,
            "analysis_mpp": self.analysis_mpp,
            "context_a": self.context_a,
            "geometry": dict(self.geometry),
            "normalization": dict(self.normalization),
            "channels": list(self.channels),
            "rgb": self.rgb,
            "strategy": self.strategy,
            "head_input": self.head_input,
            "feature_norm": self.feature_norm,
            "config": self.config,
            "metrics": self.metrics,
            "provenance": self.provenance,
            "versions": dict(self.versions),
            "created": self.created,
        }
        if self.has_expert:
            out["expert_share"] = self.expert_share
        if self.partner is not None:
            partner = self.partner.to_json_dict()
            for key in ("format", "version", "versions", "created"):
                partner.pop(key)
            out["partner"] = partner
        if weights_sha256 is not None:
            out["weights_sha256"] = weights_sha256
        return out

    def describe(self) -> dict[str, Any]:
        """A compact JSON-able summary for the CLI and the server.

        Holds the classes (name, RGB colour or ``None``, threshold or ``None``, in head order),
        backbone, feature dimension, patch size in level-0 px and um, mpp, analysis mpp and
        downsample, channels, rgb, strategy, the scalar top-level metrics, versions, creation
        time and source file.
        """
        scalar = (str, int, float, bool, type(None))
        return {
            "classes": [
                {
                    "name": c,
                    "color": list(self.colors[c]) if c in self.colors else None,
                    "threshold": self.thresholds.get(c),
                }
                for c in self.classes
            ],
            "backbone": self.backbone,
            "feature_dim": self.feature_dim,
            "patch_size_l0": list(self.patch_size_l0),
            "patch_size_um": None if self.patch_size_um is None else list(self.patch_size_um),
            "mpp": self.mpp,
            "analysis_mpp": self.analysis_mpp,
            "analysis_downsample": self.analysis_downsample,
            "channels": list(self.channels),
            "rgb": self.rgb,
            "strategy": self.strategy,
            "head_input": self.head_input,
            "feature_norm": self.feature_norm,
            "partner": None if self.partner is None else self.partner._partner_summary(),
            "metrics": {k: v for k, v in self.metrics.items() if isinstance(v, scalar)},
            "versions": dict(self.versions),
            "created": self.created,
            "source": None if self.source is None else str(self.source),
        }

    # --- modules ----------------------------------------------------------------------------
    def _where(self) -> str:
        return f"{self.source}: " if self.source is not None else ""

    def build_trunk(self) -> tuple[nn.Module, BackboneSpec]:
        """Rebuild the trained trunk on the CPU, in eval mode, with gradients off.

        The global RNG is left untouched. Move the module to a device yourself.

        Raises
        ------
        BundleError
            if the backbone is not registered (a custom backbone must be registered with
            :func:`simsearch_wsi.features.backbones.register_backbone` before the bundle is used),
            or the stored trunk weights do not fit it.
        """
        try:
            spec = get_backbone_spec(self.backbone)
        except ConfigError:
            raise BundleError(
                f"{self._where()}the bundle's backbone {self.backbone!r} is not registered "
                f"(available: {', '.join(available_backbones())}); a custom backbone must be "
                "registered with register_backbone() before the bundle is loaded"
            ) from None
        with torch.random.fork_rng(devices=[]):  # builders' default init must not move global RNG
            module = spec.builder()
        expected = module.state_dict()
        missing = sorted(set(expected) - set(self.trunk_state))
        unexpected = sorted(set(self.trunk_state) - set(expected))
        wrong = sorted(
            k
            for k in set(expected) & set(self.trunk_state)
            if tuple(expected[k].shape) != tuple(self.trunk_state[k].shape)
        )
        problems = [
            f"{what} {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        if wrong:
            k = wrong[0]
            problems.append(
                f"{k} has shape {tuple(self.trunk_state[k].shape)}, expected "
                f"{tuple(expected[k].shape)}"
            )
        if problems:
            raise BundleError(
                f"{self._where()}bundle trunk does not match backbone {self.backbone!r} "
                f"({'; '.join(problems)}); was it trained with another backbone?"
            )
        module.load_state_dict(self.trunk_state, strict=True)
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        return module, spec

    def head(self) -> nn.Linear:
        """The (D -> K) linear head on the CPU, eval mode, gradients off; global RNG untouched."""
        with torch.random.fork_rng(devices=[]):
            linear = nn.Linear(
                self.feature_dim, self.n_classes, dtype=self.head_weight.dtype, device="cpu"
            )
        with torch.no_grad():
            linear.weight.copy_(self.head_weight)
            linear.bias.copy_(self.head_bias)
        linear.eval()
        linear.requires_grad_(False)
        return linear


# --- writing ----------------------------------------------------------------------------------
def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import numpy

    import simsearch_wsi

    def installed(name: str, fallback: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return fallback

    return {
        "simsearch_wsi": installed("simsearch_wsi", simsearch_wsi.__version__),
        "torch": str(torch.__version__),
        "torchvision": installed("torchvision", "not installed"),
        "numpy": str(numpy.__version__),
        "python": platform.python_version(),
    }


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    # a copy, so that a view never drags its whole storage into the file
    return tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)


def _tensors_of(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """One model's tensors under their ``weights.pt`` keys (its partner's not included)."""
    tensors = {f"{TRUNK_PREFIX}{k}": _cpu_copy(v) for k, v in bundle.trunk_state.items()}
    tensors[HEAD_WEIGHT_KEY] = _cpu_copy(bundle.head_weight)
    tensors[HEAD_BIAS_KEY] = _cpu_copy(bundle.head_bias)
    if bundle.memory_vectors is not None and bundle.memory_owner is not None:
        tensors[MEMORY_VECTORS_KEY] = _cpu_copy(bundle.memory_vectors)
        tensors[MEMORY_OWNER_KEY] = _cpu_copy(bundle.memory_owner)
    if bundle.expert_mask is not None:
        assert bundle.expert_weight is not None and bundle.expert_bias is not None
        tensors[EXPERT_MASK_KEY] = _cpu_copy(bundle.expert_mask)
        tensors[EXPERT_WEIGHT_KEY] = _cpu_copy(bundle.expert_weight)
        tensors[EXPERT_BIAS_KEY] = _cpu_copy(bundle.expert_bias)
    return tensors


def save_bundle(path: str | os.PathLike[str], bundle: ModelBundle) -> Path:
    """Write ``bundle`` to ``path`` as one zip file, atomically.

    Empty ``versions`` and ``created`` are filled (library versions; UTC time to the second).
    Tensors are stored contiguous on the CPU. A crash or an error never leaves a half-written
    file at ``path``; an existing file there is replaced only once the new one is complete.

    Returns
    -------
    Path
        ``path``.
    """
    final = Path(path)
    if final.is_dir():
        raise BundleError(f"{final}: is a folder; give a file name for the model bundle")
    if bundle.has_expert and bundle.partner is None:
        raise BundleError(f"{final}: {_LONE_EXPERT}; save it as an ensemble's partner")
    filled = replace(
        bundle,
        versions=bundle.versions or _library_versions(),
        created=bundle.created or datetime.now(UTC).isoformat(timespec="seconds"),
    )
    tensors = _tensors_of(filled)
    if filled.partner is not None:
        tensors.update({PARTNER_PREFIX + k: v for k, v in _tensors_of(filled.partner).items()})
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    weights = buffer.getbuffer()  # no copy of what may be a large byte string
    meta = filled.to_json_dict(weights_sha256=hashlib.sha256(weights).hexdigest())
    text = json.dumps(meta, indent=2, allow_nan=False) + "\n"
    with atomic_path(final) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, data in ((METADATA_MEMBER, text.encode("utf-8")), (WEIGHTS_MEMBER, weights)):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_STORED
            zf.writestr(info, data)
    return final


# --- reading ----------------------------------------------------------------------------------
_Reader = Callable[[Path, dict[str, Any], zipfile.ZipFile], ModelBundle]

_V1_REQUIRED = (
    "backbone",
    "classes",
    "colors",
    "thresholds",
    "patch_size_l0",
    "mpp",
    "analysis_downsample",
    "context_a",
    "geometry",
    "normalization",
    "channels",
    "rgb",
    "strategy",
    "config",
    "metrics",
    "weights_sha256",
)


def _read_member(path: Path, zf: zipfile.ZipFile, member: str) -> bytes:
    try:
        return zf.read(member)
    except KeyError:
        raise BundleError(
            f"{path}: incomplete model bundle: member {member!r} is missing; {_COPY_HINT}"
        ) from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        # a bad CRC, a truncated member or a broken compressed stream
        raise BundleError(
            f"{path}: corrupt model bundle: member {member!r} cannot be read ({_first_line(exc)}); "
            f"{_COPY_HINT}"
        ) from None


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message, shortened to ``limit`` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _no_partner(path: Path, meta: dict[str, Any]) -> None:
    """A partner model is a version 3 field: an older file that names one was edited (or
    written with the wrong version), and reading it as one model would drop half of it."""
    if meta.get("partner") is not None:
        raise BundleError(
            f"{path}: bundle.json of version {meta.get('version')} has a 'partner' model, which "
            f"only version 3 and later hold; {_COPY_HINT}"
        )


def _read_v1(path: Path, meta: dict[str, Any], zf: zipfile.ZipFile) -> ModelBundle:
    """Version 1: heads on the trunk's pooled features (``head_input`` "trunk")."""
    _no_partner(path, meta)
    return _read(path, {**meta, "head_input": "trunk", "feature_norm": "none"}, zf)


def _read_v2(path: Path, meta: dict[str, Any], zf: zipfile.ZipFile) -> ModelBundle:
    """Version 2: version 1 plus ``head_input`` and ``feature_norm``."""
    _no_partner(path, meta)
    return _read_v2_fields(path, meta, zf)


def _read_v2_fields(path: Path, meta: dict[str, Any], zf: zipfile.ZipFile) -> ModelBundle:
    missing = [k for k in ("head_input", "feature_norm") if k not in meta]
    if missing:
        raise BundleError(
            f"{path}: incomplete model bundle: bundle.json lacks {missing}; "
            f"restore them or re-train"
        )
    return _read(path, meta, zf)


def _read_v3(path: Path, meta: dict[str, Any], zf: zipfile.ZipFile) -> ModelBundle:
    """Version 3: version 2 plus an optional ``partner`` model (its metadata nested under
    ``partner``, its tensors under ``partner.`` in weights.pt)."""
    partner = meta.get("partner")
    if "expert_share" in meta or (isinstance(partner, dict) and "expert_share" in partner):
        raise BundleError(
            f"{path}: bundle.json of version {meta.get('version')} has a similarity expert, "
            f"which only version 4 holds; {_COPY_HINT}"
        )
    return _read_v4(path, meta, zf)


def _read_v4(path: Path, meta: dict[str, Any], zf: zipfile.ZipFile) -> ModelBundle:
    """Version 4: version 3 plus an optional similarity expert of a ``search`` head (its
    ``expert_share`` in the metadata, its tensors under ``expert.`` in weights.pt)."""
    partner = meta.get("partner")
    if partner is not None and not isinstance(partner, dict):
        raise BundleError(f"{path}: bundle.json 'partner' must be an object; {_COPY_HINT}")
    return _read_v2_fields(path, meta, zf)


def _read(path: Path, meta: dict[str, Any], zf: zipfile.ZipFile) -> ModelBundle:
    missing = [k for k in _V1_REQUIRED if k not in meta]
    if missing:
        raise BundleError(
            f"{path}: incomplete model bundle: bundle.json lacks {missing}; "
            f"restore them or re-train"
        )
    weights = _read_member(path, zf, WEIGHTS_MEMBER)
    if hashlib.sha256(weights).hexdigest() != meta["weights_sha256"]:
        raise BundleError(f"{path}: corrupt: weights checksum mismatch; copy the file again")
    try:
        tensors = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt pickle or zip
        raise BundleError(
            f"{path}: corrupt model bundle: weights.pt cannot be loaded "
            f"({type(exc).__name__}: {_first_line(exc)}); {_COPY_HINT}"
        ) from None
    if not isinstance(tensors, dict) or not all(torch.is_tensor(v) for v in tensors.values()):
        raise BundleError(f"{path}: weights.pt is not a dict of tensors; {_COPY_HINT}")
    partner = None
    partner_meta = meta.get("partner")
    if isinstance(partner_meta, dict):
        missing = [
            k
            for k in (*_V1_REQUIRED, "head_input", "feature_norm")
            if k != "weights_sha256" and k not in partner_meta
        ]
        if missing:
            raise BundleError(
                f"{path}: incomplete model bundle: the partner model's metadata lacks "
                f"{missing}; restore them or re-train"
            )
        partner_tensors = {
            k.removeprefix(PARTNER_PREFIX): v
            for k, v in tensors.items()
            if isinstance(k, str) and k.startswith(PARTNER_PREFIX)
        }
        partner = _bundle_from(path, partner_meta, partner_tensors, None, what="partner model")
    elif any(isinstance(k, str) and k.startswith(PARTNER_PREFIX) for k in tensors):
        raise BundleError(
            f"{path}: incomplete model bundle: weights.pt holds a partner model's tensors but "
            f"bundle.json has no 'partner'; {_COPY_HINT}"
        )
    own = {
        k: v
        for k, v in tensors.items()
        if not (isinstance(k, str) and k.startswith(PARTNER_PREFIX))
    }
    model = _bundle_from(path, meta, own, partner, what="model")
    if model.has_expert and model.partner is None:
        raise BundleError(f"{path}: invalid model bundle: {_LONE_EXPERT}; fix it or re-train")
    return model


def _bundle_from(
    path: Path,
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    partner: ModelBundle | None,
    *,
    what: str,
) -> ModelBundle:
    """One model of a bundle file from its metadata and its tensors (keys without a partner
    prefix)."""
    trunk = {
        k.removeprefix(TRUNK_PREFIX): v
        for k, v in tensors.items()
        if isinstance(k, str) and k.startswith(TRUNK_PREFIX)
    }
    lacking = [k for k in (HEAD_WEIGHT_KEY, HEAD_BIAS_KEY) if k not in tensors]
    if not trunk:
        lacking.append("trunk.*")
    if lacking:
        raise BundleError(
            f"{path}: incomplete model bundle: weights.pt lacks "
            f"{'' if what == 'model' else f'the {what} tensors '}{lacking}; {_COPY_HINT}"
        )
    try:
        return ModelBundle(
            backbone=meta["backbone"],
            trunk_state=trunk,
            head_weight=tensors[HEAD_WEIGHT_KEY],
            head_bias=tensors[HEAD_BIAS_KEY],
            classes=meta["classes"],
            colors=meta["colors"],
            thresholds=meta["thresholds"],
            patch_size_l0=meta["patch_size_l0"],
            mpp=meta["mpp"],
            analysis_downsample=meta["analysis_downsample"],
            context_a=meta["context_a"],
            geometry=meta["geometry"],
            normalization=meta["normalization"],
            channels=meta["channels"],
            rgb=meta["rgb"],
            strategy=meta["strategy"],
            head_input=meta["head_input"],
            feature_norm=meta["feature_norm"],
            memory_vectors=tensors.get(MEMORY_VECTORS_KEY),
            memory_owner=tensors.get(MEMORY_OWNER_KEY),
            expert_mask=tensors.get(EXPERT_MASK_KEY),
            expert_weight=tensors.get(EXPERT_WEIGHT_KEY),
            expert_bias=tensors.get(EXPERT_BIAS_KEY),
            expert_share=meta.get("expert_share", 0.0),
            config=meta["config"],
            metrics=meta["metrics"],
            provenance=meta.get("provenance", {}),
            versions=meta.get("versions", {}),
            created=meta.get("created", ""),
            partner=partner,
            source=path,
        )
    except BundleError as exc:
        raise BundleError(
            f"{path}: invalid model bundle{'' if what == 'model' else f' ({what})'}: {exc} "
            "(fix bundle.json or re-train)"
        ) from None


# one reader per format version; a new version adds its reader here and keeps the old ones
_READERS: dict[int, _Reader] = {1: _read_v1, 2: _read_v2, 3: _read_v3, 4: _read_v4}


def load_bundle(path: str | os.PathLike[str]) -> ModelBundle:
    """Read a model bundle written by :func:`save_bundle` (tensors on the CPU).

    Raises
    ------
    BundleNotFoundError
        ``path`` does not exist (also a ``FileNotFoundError``).
    BundleError
        the file is not a model bundle, is truncated or corrupt (checksum), lacks a member, a
        tensor or a metadata key, is of another format, or of a version this release cannot read.
    """
    where = Path(path)
    if not where.exists():
        raise BundleNotFoundError(
            f"{where}: model bundle not found; check the path or {_TRAIN_HINT}"
        )
    if where.is_dir():
        raise BundleError(f"{where}: is a folder, not a model bundle file; {_TRAIN_HINT}")
    try:
        zf = zipfile.ZipFile(where)
    except (zipfile.BadZipFile, EOFError) as exc:
        with where.open("rb") as fh:
            head = fh.read(4)
        if head == b"PK\x03\x04":
            raise BundleError(
                f"{where}: corrupt model bundle (truncated or damaged zip archive: "
                f"{_first_line(exc)}); {_COPY_HINT}"
            ) from None
        raise BundleError(
            f"{where}: not a simsearch-wsi model bundle (not a zip archive); {_TRAIN_HINT}"
        ) from None
    with zf:
        raw = _read_member(where, zf, METADATA_MEMBER)
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(
                f"{where}: bundle.json is not valid JSON ({_first_line(exc)}); "
                "restore it or re-train"
            ) from None
        if not isinstance(meta, dict):
            raise BundleError(f"{where}: bundle.json must hold a JSON object; {_COPY_HINT}")
        fmt = meta.get("format")
        if fmt != BUNDLE_FORMAT:
            raise BundleError(
                f"{where}: not a simsearch-wsi model bundle (format {fmt!r}, expected "
                f"{BUNDLE_FORMAT!r}); {_TRAIN_HINT}"
            )
        version = meta.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise BundleError(
                f"{where}: model bundle version {version!r} is not a version number; "
                f"restore bundle.json or re-train"
            )
        if version > BUNDLE_VERSION:
            raise BundleError(
                f"{where}: model bundle version {version} was written by a newer simsearch_wsi "
                f"(this one reads up to version {BUNDLE_VERSION}); upgrade simsearch_wsi"
            )
        reader = _READERS.get(version)
        if reader is None:
            raise BundleError(
                f"{where}: model bundle version {version} is unknown to this simsearch_wsi "
                f"(it reads versions {sorted(_READERS)}); re-train the model"
            )
        return reader(where, meta, zf)
