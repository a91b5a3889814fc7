"""Training patches read on the fly from slides and plates, with weighted oversampling.

A :class:`PatchSample` is a place on an image (the centre of a patch, level-0 pixels) with a class.
A :class:`PatchSet` is a list of them with their class names; it draws batches in which every
class is equally likely (weighted oversampling: a sample's weight is ``1 / count(its class)``).

A :class:`PatchReader` reads square crops around samples through the I/O layer (no exported PNG
folders). Frames: a crop is ``side_a = window_a + 2 * context_a`` analysis pixels, where the
analysis grid of an image is the one :meth:`AnalysisScale.for_patch` picks for the experiment's
patch size (the grid the similarity search used), ``window_a`` is the pooled window (whole trunk
cells) and ``context_a`` the context read around it so that the trunk sees the patch with its
surroundings, as it does when it runs densely over tiles. Each crop is read once with a margin of
``max_jitter_a`` for translation jitter and kept in memory up to a budget; later epochs slice it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.features.extractor import (
    RESAMPLE_DENOMINATOR,
    AnalysisScale,
    read_analysis_region,
)
from simsearch_wsi.features.preprocess import ChannelNormalization, resolve_channels
from simsearch_wsi.io.base import ImageSource

Source = Literal[
    "prototype", "positive", "negative", "background", "noisy", "mined-background", "random"
]


@dataclass(frozen=True)
class PatchSample:
    """A patch centred at ``center_l0`` (x, y level-0 pixels) of ``image`` with class ``label``
    (an index into the owning set's classes); ``source`` says where it came from."""

    image: str
    center_l0: tuple[float, float]
    label: int
    source: Source = "positive"


@dataclass(frozen=True)
class PatchSet:
    """Samples with their class names; ``labels`` index ``classes``."""

    samples: tuple[PatchSample, ...]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        bad = [s.label for s in self.samples if not 0 <= s.label < len(self.classes)]
        if bad:
            raise ConfigError(
                f"patch labels {sorted(set(bad))} are outside the {len(self.classes)} classes"
            )

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> NDArray[np.int64]:
        return np.asarray([s.label for s in self.samples], dtype=np.int64)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}

    def sampling_weights(self) -> NDArray[np.float64]:
        """(N,) probabilities, equal total mass per present class (weighted oversampling)."""
        if not self.samples:
            raise ConfigError("no patches to sample from")
        labels = self.labels
        counts = np.bincount(labels, minlength=len(self.classes)).astype(np.float64)
        w = 1.0 / counts[labels]
        out: NDArray[np.float64] = w / w.sum()
        return out

    def draw(self, n: int, rng: np.random.Generator) -> NDArray[np.int64]:
        """``n`` indices drawn with replacement by :meth:`sampling_weights`."""
        idx: NDArray[np.int64] = rng.choice(len(self.samples), size=n, p=self.sampling_weights())
        return idx

    def subset(self, indices: Sequence[int] | NDArray[np.int64]) -> PatchSet:
        return PatchSet(tuple(self.samples[int(i)] for i in indices), self.classes)


@dataclass(frozen=True)
class CropGeometry:
    """How crops are cut: pooled window and context in analysis pixels, at the analysis scale
    the experiment's patch size ``patch_size_l0`` (longer side, level-0 px) selects."""

    patch_size_l0: float
    window_a: int
    context_a: int
    max_jitter_a: int = 0

    def __post_init__(self) -> None:
        if self.window_a <= 0 or self.context_a < 0 or self.max_jitter_a < 0:
            raise ConfigError(
                f"crop window must be > 0 and context/jitter >= 0 analysis px, got window "
                f"{self.window_a}, context {self.context_a}, jitter {self.max_jitter_a}"
            )

    @property
    def side_a(self) -> int:
        """Crop side handed to the model, analysis pixels."""
        return self.window_a + 2 * self.context_a


def stratified_split(
    patches: PatchSet, fraction: float, *, rng: np.random.Generator, min_per_class: int
) -> tuple[PatchSet, PatchSet] | None:
    """Hold out ``fraction`` of each class (seeded); ``None`` when some class has fewer than
    ``min_per_class`` samples to hold out (too few to measure anything)."""
    labels = patches.labels
    train_idx: list[int] = []
    val_idx: list[int] = []
    for k in range(len(patches.classes)):
        members = np.flatnonzero(labels == k)
        if members.size == 0:
            continue
        n_val = round(fraction * members.size)
        if n_val < min_per_class or members.size - n_val < 1:
            return None
        perm = rng.permutation(members)
        val_idx += perm[:n_val].tolist()
        train_idx += perm[n_val:].tolist()
    return patches.subset(sorted(train_idx)), patches.subset(sorted(val_idx))


class PatchReader:
    """Reads (N, C, side_a, side_a) float32 [0, 1] crops around samples, thread-safe.

    Parameters
    ----------
    crop
        the crop geometry.
    normalization
        the dataset's normalisation of the image channels (all channels of the images).
    channels
        channel names to use, in order.
    open_image
        ``path -> ImageSource`` (the caller decides how images are opened, e.g. with an mpp).
    cache_bytes
        memory for crops read so far; beyond it crops are read again when needed.
    """

    def __init__(
        self,
        crop: CropGeometry,
        normalization: ChannelNormalization,
        *,
        channels: Sequence[str],
        open_image: Callable[[str], ImageSource],
        cache_bytes: int = 512 << 20,
    ) -> None:
        self.crop = crop
        self.channels = tuple(channels)
        self.normalization = normalization.select(list(self.channels))
        self._open = open_image
        self._images: dict[str, tuple[ImageSource, AnalysisScale, list[int]]] = {}
        self._cache: dict[tuple[str, float, float], tuple[NDArray[Any], int, int]] = {}
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._lock = threading.Lock()

    def _image(self, path: str) -> tuple[ImageSource, AnalysisScale, list[int]]:
        with self._lock:
            if path not in self._images:
                image = self._open(path)
                scale = AnalysisScale.for_patch(image, self.crop.patch_size_l0)
                idx = resolve_channels(image.channel_names, list(self.channels))
                self._images[path] = (image, scale, idx)
            return self._images[path]

    def _raw(self, sample: PatchSample) -> tuple[NDArray[Any], int, int]:
        """The crop plus jitter margin inside a grid-aligned read, raw dtype, and the crop's
        offset (x, y) in it. Reads start at multiples of :data:`RESAMPLE_DENOMINATOR` analysis
        pixels, so crops lie on exactly the pixel grid the dense tiles are read on."""
        key = (sample.image, *sample.center_l0)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        image, scale, idx = self._image(sample.image)
        m, side = self.crop.max_jitter_a, self.crop.side_a
        cx_a = sample.center_l0[0] / scale.downsample_x
        cy_a = sample.center_l0[1] / scale.downsample_y
        x0, y0 = round(cx_a - side / 2) - m, round(cy_a - side / 2) - m
        g = RESAMPLE_DENOMINATOR
        ax0, ay0 = (x0 // g) * g, (y0 // g) * g
        ax1, ay1 = -(-(x0 + side + 2 * m) // g) * g, -(-(y0 + side + 2 * m) // g) * g
        raw = read_analysis_region(image, scale, ax0, ay0, ax1 - ax0, ay1 - ay0)
        entry = (np.ascontiguousarray(raw[..., idx]), x0 - ax0, y0 - ay0)
        with self._lock:
            if self._cached + entry[0].nbytes <= self._cache_bytes:
                self._cache[key] = entry
                self._cached += entry[0].nbytes
        return entry

    def read(
        self,
        samples: Sequence[PatchSample],
        *,
        rng: np.random.Generator | None = None,
    ) -> torch.Tensor:
        """(N, C, side_a, side_a) float32 in [0, 1]; with ``rng`` each crop is shifted by a
        random whole-pixel offset of up to ``max_jitter_a`` (translation augmentation)."""
        m, side = self.crop.max_jitter_a, self.crop.side_a
        out = np.empty((len(samples), len(self.channels), side, side), dtype=np.float32)
        for n, sample in enumerate(samples):
            raw, ox, oy = self._raw(sample)
            dx, dy = rng.integers(-m, m + 1, size=2).tolist() if rng is not None and m else (0, 0)
            x, y = ox + m + dx, oy + m + dy
            window = raw[y : y + side, x : x + side]
            out[n] = self.normalization.apply(window).transpose(2, 0, 1)
        return torch.from_numpy(out)

    def close(self) -> None:
        with self._lock:
            for image, _, _ in self._images.values():
                image.close()
            self._images.clear()
            self._cache.clear()
            self._cached = 0

    def __enter__(self) -> PatchReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
