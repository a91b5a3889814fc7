"""QuPath projects (``.qpproj``) through paquo, for users who prefer files to a running server.

Optional: ``pip install 'simsearch_wsi[qupath]'`` and a QuPath installation that paquo can find
(paquo drives QuPath's own Java classes; ``import paquo.projects`` raises ``ValueError`` when no
QuPath is installed). Every function here raises :class:`QuPathUnavailableError` with what to do
when either is missing.

Objects cross between paquo and this project as QuPath GeoJSON (``to_geojson`` /
:func:`~simsearch_wsi.qupath.geojson.read_features`), so the dialect lives in one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simsearch_wsi.core.errors import ConfigError, SimSearchError
from simsearch_wsi.io.uri import local_path
from simsearch_wsi.qupath.geojson import Annotation, class_color, read_features


class QuPathUnavailableError(SimSearchError, RuntimeError):
    """paquo is not installed, or it cannot find a QuPath installation."""


def _paquo() -> tuple[Any, Any]:
    """(paquo.projects, paquo.classes), or QuPathUnavailableError saying what to install."""
    try:
        import paquo.classes as classes
        import paquo.projects as projects
    except ImportError as exc:
        raise QuPathUnavailableError(
            f"paquo is not installed ({exc}); install it with pip install "
            "'simsearch_wsi[qupath]', or use the HTTP server and the Groovy scripts instead"
        ) from exc
    except ValueError as exc:  # paquo's way of saying it found no QuPath
        raise QuPathUnavailableError(
            f"paquo cannot find a QuPath installation ({exc}); install QuPath 0.4+ and point "
            "paquo at it (PAQUO_QUPATH_DIR or `paquo get_qupath`), or use the HTTP server"
        ) from exc
    return projects, classes


@dataclass(frozen=True)
class ProjectImage:
    """An image entry of a project: its name, local path, and objects."""

    name: str
    path: str
    annotations: tuple[Annotation, ...]


def _entry_path(entry: Any) -> str:
    return local_path(str(entry.uri), what=f"project image {entry.image_name!r}")


def read_project(project: str | os.PathLike[str]) -> list[ProjectImage]:
    """Every image of a QuPath project with all its objects (annotations and detections)."""
    projects, _ = _paquo()
    path = Path(project)
    if not path.exists():
        raise ConfigError(f"{path}: no such QuPath project; pass a .qpproj file or its folder")
    out = []
    with projects.QuPathProject(path, mode="r") as qp:
        for entry in qp.images:
            objects = [o.to_geojson() for o in entry.hierarchy.annotations]
            objects += [o.to_geojson() for o in entry.hierarchy.detections]
            where = f"{path} image {entry.image_name!r}"
            out.append(
                ProjectImage(
                    entry.image_name, _entry_path(entry), tuple(read_features(objects, where=where))
                )
            )
    return out


def find_image(images: list[ProjectImage], image: str | os.PathLike[str]) -> ProjectImage:
    """The project entry for ``image`` (matched by resolved path, else by entry name)."""
    wanted = Path(image)
    for entry in images:
        if Path(entry.path).resolve() == wanted.resolve() or entry.name == str(image):
            return entry
    names = ", ".join(e.name for e in images[:5])
    raise ConfigError(f"{image}: not an image of this QuPath project (images: {names}, ...)")


def write_objects(
    project: str | os.PathLike[str],
    image: str | os.PathLike[str],
    *,
    features: list[dict[str, Any]],
    replace_classes: set[str] | None = None,
) -> int:
    """Add GeoJSON objects (as written by this project: detections, and annotations such as
    segmentation regions, by their ``objectType``) to ``image``'s entry and save the project.

    Objects of ``replace_classes`` already there are removed first, detections and annotations
    alike, so a rerun replaces its earlier results instead of piling up. Returns how many were
    added."""
    from shapely.geometry import shape

    projects, classes = _paquo()
    path = Path(project)
    with projects.QuPathProject(path, mode="r+") as qp:
        entries = [
            e
            for e in qp.images
            if Path(_entry_path(e)).resolve() == Path(image).resolve() or e.image_name == str(image)
        ]
        if not entries:
            raise ConfigError(f"{image}: not an image of the QuPath project {path}")
        hierarchy = entries[0].hierarchy
        if replace_classes:
            for kind in (hierarchy.detections, hierarchy.annotations):
                old = [
                    o
                    for o in kind
                    if o.path_class is not None and o.path_class.name in replace_classes
                ]
                for o in old:
                    kind.discard(o)
        path_classes: dict[str, Any] = {}
        for f in features:
            props = f.get("properties") or {}
            name = (props.get("classification") or {}).get("name")
            if name is not None and name not in path_classes:
                path_classes[name] = classes.QuPathPathClass(name, color=class_color(name))
            add = (
                hierarchy.add_annotation
                if props.get("objectType") == "annotation"
                else hierarchy.add_detection
            )
            add(
                roi=shape(f["geometry"]),
                path_class=path_classes.get(name) if name is not None else None,
                measurements=dict(props.get("measurements") or {}),
            )
    return len(features)
