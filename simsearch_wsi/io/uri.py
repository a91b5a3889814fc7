"""Image locations as QuPath gives them: paths, or ``file:`` URIs from ``getURIs()``."""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit

from simsearch_wsi.core.errors import ConfigError

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:([/\\]|$)")
_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def local_path(text: str, *, what: str = "image") -> str:
    """The local path named by ``text``: a path as is, or a ``file:`` URI decoded.

    ``file:/C:/a%20b.svs`` (QuPath on Windows) gives ``C:/a b.svs``; ``file:///home/a.svs`` and
    ``file:/home/a.svs`` (QuPath elsewhere) and ``file://localhost/home/a.svs`` give
    ``/home/a.svs``; ``file://server/share/a.svs`` gives the UNC path ``//server/share/a.svs``
    on Windows (elsewhere: ConfigError, a file on another machine).
    A Windows path such as ``C:\\slides\\a.svs`` is a path, not a URI.

    Raises
    ------
    ConfigError
        another URI scheme (only local files are supported), a ``file:`` URI with a query or
        fragment (a sub-image of a container: not supported), or an empty path.
    """
    if _WINDOWS_DRIVE.match(text) or not _URI_SCHEME.match(text):
        if not text:
            raise ConfigError(f"{what}: empty path")
        return text
    parts = urlsplit(text)
    if parts.scheme.lower() != "file":
        raise ConfigError(
            f"{what} {text!r}: only local files are supported (a path or a file: URI), not "
            f"{parts.scheme}: URIs; open the image from a local or mounted disk in QuPath"
        )
    if parts.query or parts.fragment:
        raise ConfigError(
            f"{what} {text!r}: file: URIs with a query or fragment (an image inside a container "
            "file) are not supported; export the image as its own file"
        )
    try:
        path = unquote(parts.path, errors="strict")
        netloc = unquote(parts.netloc, errors="strict")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{what} {text!r}: the file: URI's percent-encoding is not UTF-8"
        ) from None
    if netloc and netloc.lower() != "localhost":
        if os.name != "nt":
            raise ConfigError(
                f"{what} {text!r}: the file: URI names another machine ({netloc}); only files "
                "on this machine are supported (mount the share and use its local path)"
            )
        path = f"//{netloc}{path}"  # UNC: \\server\share\...
    elif re.match(r"^/[A-Za-z]:", path):
        path = path[1:]  # /C:/... -> C:/...
    if not path:
        raise ConfigError(f"{what} {text!r}: the file: URI names no path")
    return path
