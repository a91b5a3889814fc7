"""Pseudo ground truth derived from the pixels by a fixed colour rule, where no expert truth
exists (the demo's real IHC image).

This is *not* expert annotation: it is a transparent, reproducible rule a reviewer can inspect
(and the demo says so). It lets the simulated user play a reviewer who accepts a suggestion when
the rule agrees, and it gives an agreement score (IoU) for the trained model's segmentation.

Rule for a DAB + haematoxylin brightfield image (RGB, 8-bit), colour deconvolution by
:func:`skimage.color.rgb2hed` (Ruifrok & Johnston stain vectors):

``Epithelium``
    DAB-rich tissue: the fraction of pixels with DAB optical density > :data:`DAB_OD`, smoothed
    by a Gaussian of :data:`DAB_SIGMA_PX` pixels, is above 0.5. On scikit-image's IHC sample
    (colonic glands, FHL2 revealed with DAB) this marks the glands.
``Stroma``
    Nuclei-bearing tissue away from DAB: the smoothed (:data:`NUCLEI_SIGMA_PX`) fraction of
    pixels with haematoxylin optical density > :data:`HEMATOXYLIN_OD` is above
    :data:`NUCLEI_FRACTION`, and the smoothed DAB fraction is below 0.2.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.eval.truth import GroundTruth

__all__ = [
    "DAB_OD",
    "DAB_SIGMA_PX",
    "HEMATOXYLIN_OD",
    "IHC_CLASSES",
    "NUCLEI_FRACTION",
    "NUCLEI_SIGMA_PX",
    "ihc_pseudo_truth",
    "ihc_tissue_labels",
    "label_fractions",
]

IHC_CLASSES = ("Epithelium", "Stroma")
DAB_OD = 0.06
DAB_SIGMA_PX = 6.0
HEMATOXYLIN_OD = 0.03
NUCLEI_SIGMA_PX = 12.0
NUCLEI_FRACTION = 0.1


def ihc_tissue_labels(rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """(H, W) labels of an (H, W, 3) uint8 DAB + haematoxylin image by the module's rule:
    0 = neither, 1 = ``Epithelium``, 2 = ``Stroma``. Pixels are full resolution."""
    from skimage.color import rgb2hed
    from skimage.filters import gaussian

    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ConfigError(
            f"the IHC rule needs an (H, W, 3) uint8 RGB image, got {a.shape} {a.dtype}"
        )
    hed = rgb2hed(a)
    dab_fraction = gaussian((hed[..., 2] > DAB_OD).astype(np.float32), sigma=DAB_SIGMA_PX)
    nuclei_fraction = gaussian(
        (hed[..., 0] > HEMATOXYLIN_OD).astype(np.float32), sigma=NUCLEI_SIGMA_PX
    )
    labels = np.zeros(a.shape[:2], dtype=np.uint8)
    labels[(nuclei_fraction > NUCLEI_FRACTION) & (dab_fraction < 0.2)] = 2
    labels[dab_fraction > 0.5] = 1
    return labels


def ihc_pseudo_truth(rgb: NDArray[np.uint8], *, source: str = "IHC colour rule") -> GroundTruth:
    """Region truth (:meth:`GroundTruth.from_region_mask`, classes :data:`IHC_CLASSES`) of a
    full-resolution (H, W, 3) uint8 image, mask at level 0."""
    return GroundTruth.from_region_mask(
        ihc_tissue_labels(rgb), classes=IHC_CLASSES, downsample=1.0, source=source
    )


def label_fractions(truth: GroundTruth) -> dict[str, Any]:
    """Class name -> fraction of the image the truth's mask gives it."""
    if truth.mask is None:
        return {}
    n = truth.mask.size
    return {
        name: float(np.count_nonzero(truth.mask == k)) / n
        for k, name in enumerate(truth.mask_classes, start=1)
    }
