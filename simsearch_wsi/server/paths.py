"""Client-supplied paths: resolved (symlinks followed) and allowed only inside the server's roots.

Every path a route reads comes through :class:`AllowedPaths`, including the paths the server
reads from files (the images a session file names), so a file inside an allowed folder cannot
lead the server outside it (403).
"""

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.io import open_image
from simsearch_wsi.io.base import ImageSource
from simsearch_wsi.io.uri import local_path
from simsearch_wsi.review.session import SESSION_FILE, Session
from simsearch_wsi.server.errors import ApiError

__all__ = ["AllowedPaths", "require_existing", "session_doc"]


class AllowedPaths:
    """Turns client-supplied paths into resolved paths inside the allowed roots."""

    def __init__(self, roots: Sequence[Path]) -> None:
        if not roots:
            raise ConfigError("the server needs at least one allowed folder (allowed_roots)")
        resolved = []
        for root in roots:
            r = Path(root).expanduser().resolve()
            if not r.is_dir():
                raise ConfigError(f"allowed folder {root} does not exist or is not a folder")
            resolved.append(r)
        self.roots = tuple(dict.fromkeys(resolved))

    def resolve(self, text: str, *, what: str, named_by: Path | None = None) -> Path:
        """``text`` (a path or ``file:`` URI) resolved, when it lies inside an allowed root;
        else a 403 error naming it (and ``named_by``, the file that named it)."""
        raw = local_path(text, what=what)
        if "\x00" in raw:
            raise ConfigError(f"{what} {text!r}: the path contains a NUL character")
        if not Path(raw).is_absolute():
            raise ConfigError(
                f"{what} {text!r}: not an absolute path on this server; send the full path or "
                "the image's file: URI"
            )
        try:
            resolved = Path(raw).resolve()
        except (OSError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"{what} {text!r}: cannot resolve the path ({exc})") from exc
        if not any(resolved.is_relative_to(root) for root in self.roots):
            shown = "" if str(resolved) == raw else f" (resolves to {resolved})"
            if named_by is not None:
                shown += f" (named by {named_by})"
            raise ApiError(
                403,
                "forbidden_path",
                message=f"{what} {raw}{shown} is outside the folders this server may read: "
                f"{', '.join(str(r) for r in self.roots)}; restart the server allowing the "
                "folder that holds it",
            )
        return resolved

    def opener(self, *, what: str = "image") -> Callable[[str], ImageSource]:
        """``open_image`` for paths the server did not get from the client directly (plate
        fields, images named by session files): each passes :meth:`resolve` first (403)."""

        def open_allowed(text: str) -> ImageSource:
            return open_image(self.resolve(text, what=what))

        return open_allowed

    def session_images(self, session: Session, *, prototypes_only: bool = False) -> list[Path]:
        """The images ``session`` names (its prototypes' only, with ``prototypes_only``),
        resolved inside the allowed roots: a session file inside an allowed folder that names
        an image outside them is refused (403) before anything is opened."""
        file = session.root / SESSION_FILE
        images = (
            sorted({p.image for p in session.prototypes}) if prototypes_only else session.images()
        )
        return [self.resolve(p, what="session image", named_by=file) for p in images]


def require_existing(paths: Iterable[Path]) -> None:
    """A 404 for the first of ``paths`` that does not exist: a job answers a typo or a moved
    slide when it is submitted rather than failing later."""
    for p in paths:
        if not p.exists():
            raise ApiError(
                404, "ImageNotFoundError", message=f"{p}: no such file or directory; check the path"
            )


def session_doc(folder: Path | None) -> list[tuple[str, Path | None]]:
    """The session file a route rewrites, for
    :func:`~simsearch_wsi.core.pathguard.check_outputs_not_inputs`."""
    return [("session file", folder / SESSION_FILE)] if folder is not None else []
