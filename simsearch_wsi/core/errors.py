"""The project's error hierarchy.

Every error a user can meet subclasses :class:`SimSearchError` *and* the builtin exception that
matches it (``FileNotFoundError``, ``ValueError``, ...), so callers can catch either. Messages are
one line, name the input, and say what to do.
"""

from __future__ import annotations


class SimSearchError(Exception):
    """Base class of every error raised on purpose by simsearch_wsi."""


class ImageNotFoundError(SimSearchError, FileNotFoundError):
    """An image path does not exist."""


class UnsupportedFormatError(SimSearchError, ValueError):
    """A file or folder exists but is not an image format simsearch_wsi can read."""


class CorruptImageError(SimSearchError, OSError):
    """An image looked readable but its pixels or metadata could not be decoded."""


class MetadataError(SimSearchError, ValueError):
    """Image or plate metadata is missing, inconsistent, or of an unknown version."""


class RegionError(SimSearchError, ValueError):
    """A requested region, level or size is invalid for the image."""


class PlateError(SimSearchError, ValueError):
    """An OME-Zarr HCS plate, well or field is missing or malformed."""


class ConfigError(SimSearchError, ValueError):
    """A user-supplied parameter is invalid (bad channel name, non-positive size, ...)."""


class OutputOverwritesInputError(ConfigError):
    """An output path resolves to one of the command's inputs (or into/over an input folder)."""


class OutputNotWritableError(SimSearchError, OSError):
    """An output path cannot be written (no permission, read-only, parent is a file, ...)."""
