"""From a review session to training data (and the whole ``train --session`` run).

Classes are the session's classes that have at least one positive (prototype or approved
suggestion), then ``background``. Patches:

* clean positives: every prototype and every approved (or relabelled) suggestion;
* clean background: background candidates the user confirmed; when there are fewer of those than
  positives of the largest class, windows no class reaches its threshold on are mined from the
  session's images (``mined-background``);
* negatives: suggestions the user rejected, labelled with the class they were rejected for;
* noisy (self-learning): what the search suggests, with the saved prototypes and thresholds, on
  images the user has not reviewed (``noisy_images``, else the session's unreviewed images, else,
  with a note, the reviewed images away from everything labelled), plus mined background there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.features.backbones import WeightsInfo
from simsearch_wsi.features.cache import FeatureMap
from simsearch_wsi.features.extractor import FeatureExtractor, FeatureSpec, ProgressFn
from simsearch_wsi.features.norm import FeatureNormalizer
from simsearch_wsi.features.preprocess import (
    fit_normalization,
    resolve_channels,
)
from simsearch_wsi.io.base import ImageSource
from simsearch_wsi.io.selection import field_of
from simsearch_wsi.qupath.geojson import BACKGROUND_CLASS, class_color
from simsearch_wsi.review.session import Session
from simsearch_wsi.search.engine import SimSearch
from simsearch_wsi.search.mining import mine_image
from simsearch_wsi.search.probe import window_vectors
from simsearch_wsi.search.similarity import (
    PatchGeometry,
    Prototype,
    embed_prototypes,
    object_box,
    valid_windows,
)
from simsearch_wsi.train.fit import TrainConfig, TrainingData, TrainResult, train_patch_model
from simsearch_wsi.train.patches import PatchSample, PatchSet


def collect_training_data(
    session: Session,
    search: SimSearch,
    *,
    config: TrainConfig,
    open_image: Callable[[str], ImageSource],
    noisy_images: Sequence[str | os.PathLike[str]] = (),
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> TrainingData:
    """The training data of ``session`` (module docstring); mining uses ``search`` (cached
    features), so a session that was searched mines without recomputing features."""
    if session.patch_size_l0 is None or not session.prototypes:
        raise ConfigError(
            f"{session.root}: the session has no prototypes; draw classified rectangles and run "
            "`simsearch-wsi suggest --session` first"
        )
    rng = np.random.default_rng(seed)
    positives = [(p.image, p.class_name, p.box_l0, "prototype") for p in session.prototypes]
    positives += [
        (r.image, r.class_name, r.box_l0, "positive") for r in session.examples("positive")
    ]
    classes = [c for c in session.classes if any(p[1] == c for p in positives)]
    classes.append(BACKGROUND_CLASS)
    index = {c: k for k, c in enumerate(classes)}
    bg = index[BACKGROUND_CLASS]
    clean = [
        PatchSample(image, box.center_l0, index[name], source)  # type: ignore[arg-type]
        for image, name, box, source in positives
    ]
    clean += [
        PatchSample(r.image, r.box_l0.center_l0, bg, "background")
        for r in session.examples("background")
    ]
    negatives = [
        PatchSample(r.image, r.box_l0.center_l0, index[r.class_name], "negative")
        for r in session.examples("negative")
        if r.class_name in index
    ]
    notes: list[str] = []
    session_images = sorted(
        {p.image for p in session.prototypes} | {r.image for r in session.suggestions.values()}
    )
    noisy_paths = [str(Path(p).resolve()) for p in noisy_images] or [
        i for i in session_images if i not in session.reviewed_images
    ]
    if config.uses_selflearn and not noisy_paths:
        noisy_paths = list(session_images)
        notes.append(
            "every session image was reviewed: noisy patches are mined from the reviewed images, "
            "away from labelled patches (pass --noisy-images for unreviewed ones)"
        )
    largest = max(np.bincount([s.label for s in clean], minlength=len(classes))[:-1])
    need_background = int(np.sum([s.label == bg for s in clean])) < largest
    prototypes = session.all_prototypes()
    thresholds = session.thresholds
    noisy: list[PatchSample] = []
    mine_paths = list(
        dict.fromkeys(
            [
                *(session_images if need_background else []),
                *(noisy_paths if config.uses_selflearn else []),
            ]
        )
    )
    for n, path in enumerate(mine_paths):
        if progress is not None:
            progress("mining patches", n, len(mine_paths))
        with open_image(path) as image:
            mined = mine_image(
                search,
                image,
                prototypes=prototypes,
                thresholds=thresholds,
                patch_size_l0=session.patch_size_l0,
                avoid=session.labelled_boxes(path),
                n_per_class=config.noisy_per_class if path in noisy_paths else 0,
                n_background=config.background_per_image,
                rng=rng,
                progress=progress,
            )
        key = str(Path(path).resolve())
        if config.uses_selflearn and path in noisy_paths:
            noisy += [
                PatchSample(key, center, index[name], "noisy")
                for name, center, _ in mined.noisy
                if name in index
            ]
            noisy += [PatchSample(key, c, bg, "mined-background") for c in mined.background]
        if need_background and path in session_images:
            clean += [PatchSample(key, c, bg, "mined-background") for c in mined.background]
    if progress is not None and mine_paths:
        progress("mining patches", len(mine_paths), len(mine_paths))
    if need_background:
        notes.append(
            "few confirmed background patches: background was completed with windows no class "
            "reaches its threshold on (confirm background candidates for a cleaner model)"
        )
    opened = [open_image(p) for p in session_images]
    try:
        first = opened[0]
        all_names = first.channel_names
        wanted = search.settings.channels
        channels = (
            tuple(all_names[i] for i in resolve_channels(all_names, list(wanted)))
            if wanted
            else tuple(all_names)
        )
        rgb = first.is_brightfield and len(channels) == 3
        mpp = first.mpp
        plates = {str(found[0].path) if (found := field_of(im.path)) else None for im in opened}
        normalization = (  # one plate's fields: the search's plate-wide rule (issue 30)
            search.normalization_for(first)
            if len(plates) == 1 and None not in plates
            else fit_normalization(opened)
        )
    finally:
        for im in opened:
            im.close()
    colors: dict[str, tuple[int, int, int]] = {
        c: tuple(session.classes[c]["color"]) if c in session.classes else class_color(c)  # type: ignore[misc]
        for c in classes
    }
    return TrainingData(
        clean=PatchSet(tuple(clean), tuple(classes)),
        negatives=PatchSet(tuple(negatives), tuple(classes)),
        noisy=PatchSet(tuple(noisy), tuple(classes)),
        patch_size_l0=session.patch_size_l0,
        normalization=normalization,
        channels=channels,
        rgb=rgb,
        mpp=mpp,
        colors=colors,
        notes=notes,
        provenance={
            "session": str(session.root),
            "images": session_images,
            "noisy_images": noisy_paths if config.uses_selflearn else [],
        },
    )


class SearchVectors:
    """The search's normalised window vectors of labelled patches (a
    :class:`simsearch_wsi.train.fit.SearchView`): each patch's image is embedded through the
    search's cache (reviewed images already are) and normalised with its own statistics, the
    window taken at the patch centre on the experiment's patch geometry."""

    def __init__(
        self,
        search: SimSearch,
        patch_size_l0: tuple[float, float],
        *,
        open_image: Callable[[str], ImageSource],
    ) -> None:
        self.search = search
        self.patch_size_l0 = patch_size_l0
        self.open_image = open_image
        self.feature_norm = search.settings.feature_norm
        self.weights = search.extractor.weights

    def with_trunk(self, trunk: torch.nn.Module, identity: str) -> SearchVectors:
        """The same vectors read through ``trunk`` (a fine-tuned copy of the search's), its
        feature maps cached beside the search's under the weights name ``identity``."""
        ext = self.search.extractor
        other = SimSearch(
            FeatureExtractor(
                trunk,
                ext.spec,
                WeightsInfo("bundle", identity, "fine-tuned trunk"),
                device=ext.device,
                autocast=ext.autocast,
            ),
            self.search.cache,
            settings=self.search.settings,
        )
        return SearchVectors(other, self.patch_size_l0, open_image=self.open_image)

    def vectors(self, patches: PatchSet, rotations: int = 1) -> torch.Tensor:
        """(rotations, N, D) unit vectors of the window centred on each patch, turned by 0, 90,
        180 and 270 degrees (the first ``rotations`` of them; the search's prototype vectors,
        :func:`simsearch_wsi.search.similarity.embed_prototypes`)."""
        if not 1 <= rotations <= 4:
            raise ConfigError(f"rotations must be 1 to 4, got {rotations}")
        classes = list(patches.classes)
        by_image: dict[str, list[int]] = {}
        for n, sample in enumerate(patches.samples):
            by_image.setdefault(sample.image, []).append(n)
        out: torch.Tensor | None = None
        width_l0, height_l0 = self.patch_size_l0
        ext = self.search.extractor
        for path, rows in by_image.items():
            with self.open_image(path) as image:
                spec, fmap = self.search.embed(image, max(width_l0, height_l0))
                geometry = PatchGeometry.from_l0(
                    width_l0, height_l0, scale=spec.scale, stride=ext.stride
                )
                normalizer = FeatureNormalizer.of(fmap, self.feature_norm)
                protos = [
                    Prototype(
                        classes[patches.samples[n].label],
                        BoxL0(
                            patches.samples[n].center_l0[0] - width_l0 / 2,
                            patches.samples[n].center_l0[1] - height_l0 / 2,
                            width_l0,
                            height_l0,
                        ),
                    )
                    for n in rows
                ]
                vecs = embed_prototypes(
                    image,
                    ext,
                    spec=spec,
                    geometry=geometry,
                    prototypes=protos,
                    classes=classes,
                    normalizer=normalizer,
                ).vectors  # (4 * n, D), the rotations of each patch together
            if out is None:
                out = torch.zeros(rotations, len(patches), vecs.shape[1])
            out[:, rows] = vecs.reshape(len(rows), 4, -1)[:, :rotations].transpose(0, 1)
        return out if out is not None else torch.zeros(rotations, 0, 0)

    def _random_windows(
        self, path: str, n: int, rng: np.random.Generator
    ) -> tuple[FeatureSpec, FeatureMap, PatchGeometry, NDArray[np.int64]]:
        """The image's cached feature map and up to ``n`` of its embedded windows (k, 2) as
        (i, j), drawn without replacement and sorted."""
        width_l0, height_l0 = self.patch_size_l0
        with self.open_image(path) as image:
            spec, fmap = self.search.embed(image, max(width_l0, height_l0))
        geometry = PatchGeometry.from_l0(
            width_l0, height_l0, scale=spec.scale, stride=self.search.extractor.stride
        )
        valid = np.argwhere(valid_windows(fmap, geometry))
        pick = np.sort(rng.choice(len(valid), size=min(n, len(valid)), replace=False))
        return spec, fmap, geometry, valid[pick].astype(np.int64)

    def unlabelled_vectors(
        self, images: Sequence[str], n: int, *, rng: np.random.Generator
    ) -> torch.Tensor:
        """(n', D) unit vectors of up to ``n`` windows (an equal share per image) drawn without
        replacement among the embedded windows of ``images``, read from the cached feature maps
        exactly as the model is applied densely (:func:`simsearch_wsi.search.probe.
        memory_logits_map`); n' < n where an image has fewer embedded windows."""
        per_image = -(-n // max(1, len(images)))
        parts: list[torch.Tensor] = []
        for path in images:
            _, fmap, geometry, windows = self._random_windows(path, per_image, rng)
            if len(windows):
                normalizer = FeatureNormalizer.of(fmap, self.feature_norm)
                parts.append(
                    window_vectors(fmap, geometry, normalizer=normalizer, windows_ij=windows)
                )
        return torch.cat(parts) if parts else torch.zeros(0, 0)

    def unlabelled_patches(
        self, images: Sequence[str], n: int, *, classes: Sequence[str], rng: np.random.Generator
    ) -> PatchSet:
        """Up to ``n`` patches (an equal share per image), labelled background, centred on
        windows drawn without replacement among the embedded windows of ``images``."""
        background = list(classes).index(BACKGROUND_CLASS)
        per_image = -(-n // max(1, len(images)))
        samples: list[PatchSample] = []
        for path in images:
            spec, _, geometry, windows = self._random_windows(path, per_image, rng)
            for i, j in windows:
                box = object_box(geometry, spec, i=float(i), j=float(j))
                samples.append(PatchSample(path, box.center_l0, background, source="random"))
        return PatchSet(tuple(samples), tuple(classes))


def train_session(
    session: Session,
    search: SimSearch,
    *,
    config: TrainConfig,
    open_image: Callable[[str], ImageSource],
    noisy_images: Sequence[str | os.PathLike[str]] = (),
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Collect the session's training data and train (see :func:`train_patch_model`); the
    search's trunk is the starting point, and the training runs in the search's precision: where
    the search's extractor runs in float32 (``--no-autocast``, or a CPU without native bf16),
    so does the training, whatever ``config.autocast`` asks."""
    config = config.replace(autocast=config.autocast and search.extractor.autocast)
    data = collect_training_data(
        session,
        search,
        config=config,
        open_image=open_image,
        noisy_images=noisy_images,
        seed=seed,
        progress=progress,
    )
    return train_patch_model(
        data,
        search.extractor,
        config=config,
        open_image=open_image,
        search=SearchVectors(search, data.patch_size_l0, open_image=open_image),
        device=device,
        seed=seed,
        progress=progress,
    )
