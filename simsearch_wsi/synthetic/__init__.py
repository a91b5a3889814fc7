"""Seeded synthetic test data written to disk, returned together with its ground truth.

Five generators, all fast enough for unit tests and a demo:

:func:`make_synthetic_slide` (:mod:`~simsearch_wsi.synthetic.brightfield`)
    a brightfield (H&E-like, uint8 RGB) tiled pyramidal TIFF with motifs of known classes
    (:mod:`~simsearch_wsi.synthetic.motifs`) stamped inside irregular tissue regions.
:func:`make_synthetic_omezarr_slide` (:mod:`~simsearch_wsi.synthetic.brightfield`)
    the same brightfield content written as an OME-Zarr image (NGFF 0.4 or 0.5).
:func:`make_fluorescence_slide` (:mod:`~simsearch_wsi.synthetic.fluorescence`)
    a multichannel fluorescence OME-TIFF (planar CYX pages, SubIFD pyramid) with cells whose
    reporter channel is nuclear or cytoplasmic.
:func:`make_synthetic_plate` (:mod:`~simsearch_wsi.synthetic.plate`)
    an OME-Zarr HCS plate (NGFF 0.4) whose fraction of reporter-positive cells rises across
    columns, like a dose response.
:func:`make_dense_field` (:mod:`~simsearch_wsi.synthetic.dense`)
    a dense field of touching small objects, every one in the truth: nuclei of a 16-bit
    fluorescence image or red blood cells of a brightfield smear.
:func:`make_phenotype_plate` (:mod:`~simsearch_wsi.synthetic.phenotypes`)
    an OME-Zarr HCS plate of separate cells with three reporter phenotypes (absent,
    cytoplasmic, nuclear) and plate effects, optionally without a pixel size (issue 30).

The ground truth types are in :mod:`~simsearch_wsi.synthetic.truth`. The file writers they use
are :mod:`simsearch_wsi.io`'s (:func:`write_pyramidal_tiff`, :func:`write_ome_zarr_image`,
re-exported here), since they serve real images too.

Every generator takes ``seed: int``; the same seed gives byte-identical pixels and identical
ground truth, different seeds differ. Independent parts of a scene (tissue shape, texture,
placement, motif shapes) draw from independent child streams of
``np.random.SeedSequence(seed)``, so changing e.g. ``n_per_class`` keeps the tissue where it was.

Coordinates of the ground truth are level-0 pixels (``_l0``), origin top-left, x right, y down.
"""

from simsearch_wsi.io.omezarr_writer import write_ome_zarr_image
from simsearch_wsi.io.tiff_writer import write_pyramidal_tiff
from simsearch_wsi.qupath.geojson import class_color
from simsearch_wsi.synthetic.brightfield import make_synthetic_omezarr_slide, make_synthetic_slide
from simsearch_wsi.synthetic.dense import make_dense_field
from simsearch_wsi.synthetic.fluorescence import FLUORESCENCE_CLASSES, make_fluorescence_slide
from simsearch_wsi.synthetic.motifs import MOTIF_PAINTERS, MotifPainter
from simsearch_wsi.synthetic.phenotypes import PhenotypePlate, make_phenotype_plate
from simsearch_wsi.synthetic.plate import make_synthetic_plate
from simsearch_wsi.synthetic.truth import (
    CLASS_COLORS,
    SyntheticObject,
    SyntheticPlate,
    SyntheticSlide,
    WellTruth,
)

__all__ = [
    "CLASS_COLORS",
    "FLUORESCENCE_CLASSES",
    "MOTIF_PAINTERS",
    "MotifPainter",
    "PhenotypePlate",
    "SyntheticObject",
    "SyntheticPlate",
    "SyntheticSlide",
    "WellTruth",
    "class_color",
    "make_dense_field",
    "make_fluorescence_slide",
    "make_phenotype_plate",
    "make_synthetic_omezarr_slide",
    "make_synthetic_plate",
    "make_synthetic_slide",
    "write_ome_zarr_image",
    "write_pyramidal_tiff",
]
