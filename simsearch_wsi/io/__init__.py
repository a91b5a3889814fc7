"""Image I/O: one interface for slides, OME-Zarr images, plates and plain images.

>>> from simsearch_wsi.io import open_image
>>> with open_image("slide.svs") as img:  # doctest: +SKIP
...     tile = img.read_region((1000, 2000), 0, (512, 512))  # (512, 512, 3) uint8
"""

from simsearch_wsi.io.base import ImageSource, LevelInfo, Modality
from simsearch_wsi.io.memory import ArraySource
from simsearch_wsi.io.open import SUPPORTED_FORMATS, open_image
from simsearch_wsi.io.plate import Plate, PlateField, Well, is_plate, open_plate

__all__ = [
    "SUPPORTED_FORMATS",
    "ArraySource",
    "ImageSource",
    "LevelInfo",
    "Modality",
    "Plate",
    "PlateField",
    "Well",
    "is_plate",
    "open_image",
    "open_plate",
]
