"""simsearch_wsi: human-in-the-loop similarity search for whole-slide images and plates.

Importing the package has no side effects: no device is chosen, no RNG is seeded, nothing is
printed and no environment variable is read. Start with :func:`simsearch_wsi.io.open_image`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("simsearch_wsi")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

__all__ = ["__version__"]
