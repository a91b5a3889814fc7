"""QuPath GeoJSON: read annotations, write detections (the minimal correct dialect).

Facts (QuPath 0.4-0.7 ``QuPathTypeAdapters``): a file holds a Feature, a FeatureCollection or a
JSON array of Features; ``properties.objectType`` is lowercase (older files: ``object_type``);
``classification`` is ``{"name", "color"}`` (a string in some exports) and an object without
``color`` aborts QuPath's import, so this module always writes one; ``measurements`` must be
finite numbers; coordinates are level-0 pixels.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simsearch_wsi.atomic import write_json_atomic
from simsearch_wsi.errors import ConfigError
from simsearch_wsi.geometry import BoxL0

# Stable colours for common class names; others get a colour derived from the name.
_CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "ring": (200, 40, 40),
    "cluster": (40, 150, 40),
    "stripes": (40, 80, 220),
    "background": (128, 128, 128),
}


def class_color(name: str) -> tuple[int, int, int]:
    """A stable RGB colour per class name (same name -> same colour, in every run)."""
    if name in _CLASS_COLORS:
        return _CLASS_COLORS[name]
    import hashlib

    h = hashlib.sha256(name.encode()).digest()
    return (60 + h[0] % 180, 60 + h[1] % 180, 60 + h[2] % 180)


@dataclass(frozen=True)
class Annotation:
    """One object read from QuPath GeoJSON: class, bounding box, and whether it is a rectangle."""

    class_name: str | None
    box: BoxL0
    is_rectangle: bool
    object_type: str
    id: str | None = None
    properties: dict[str, Any] = field(default_factory=dict)


def _features(doc: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(doc, list):
        return [f for f in doc if isinstance(f, dict)]
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        feats = doc.get("features")
        if not isinstance(feats, list):
            raise ConfigError(f"{where}: FeatureCollection without a 'features' list")
        return [f for f in feats if isinstance(f, dict)]
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        return [doc]
    raise ConfigError(
        f"{where}: not GeoJSON from QuPath (expected a Feature, a FeatureCollection or an array)"
    )


def _class_name(props: dict[str, Any]) -> str | None:
    cls = props.get("classification")
    if isinstance(cls, str):
        return cls
    if isinstance(cls, dict):
        if isinstance(cls.get("name"), str):
            return str(cls["name"])
        names = cls.get("names")
        if isinstance(names, list) and names:
            return ": ".join(str(n) for n in names)
    return None


def _ring_points(geometry: dict[str, Any], where: str) -> list[tuple[float, float]]:
    gtype = geometry.get("type")
    coords: Any = geometry.get("coordinates")
    try:
        if gtype == "Polygon":
            pts = coords[0]
        elif gtype == "MultiPolygon":
            pts = [p for poly in coords for p in poly[0]]
        elif gtype == "Point":
            pts = [coords]
        elif gtype in ("LineString", "MultiPoint"):
            pts = coords
        else:
            raise ConfigError(f"{where}: unsupported geometry type {gtype!r}")
        out = [(float(p[0]), float(p[1])) for p in pts]
    except (TypeError, IndexError, ValueError) as exc:
        raise ConfigError(f"{where}: malformed {gtype} coordinates") from exc
    if not out or not all(math.isfinite(v) for p in out for v in p):
        raise ConfigError(f"{where}: geometry has no finite coordinates")
    return out


def _is_axis_rectangle(geometry: dict[str, Any], pts: list[tuple[float, float]]) -> bool:
    if geometry.get("type") != "Polygon" or len(geometry.get("coordinates", [])) != 1:
        return False
    ring = pts[:-1] if len(pts) > 1 and pts[0] == pts[-1] else pts
    if len(ring) != 4:
        return False
    xs, ys = {p[0] for p in ring}, {p[1] for p in ring}
    return len(xs) <= 2 and len(ys) <= 2  # degenerate ones too, to report "zero area"


def read_annotations(path: str | os.PathLike[str]) -> list[Annotation]:
    """Read every object of a QuPath GeoJSON file (annotations, detections, ...)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: annotation file not found; export it from QuPath as GeoJSON")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid JSON ({exc})") from exc
    out = []
    for n, feat in enumerate(_features(doc, str(p))):
        where = f"{p} feature {n}"
        props = feat.get("properties") or {}
        geometry = feat.get("geometry")
        if not isinstance(geometry, dict):
            raise ConfigError(f"{where}: missing geometry")
        pts = _ring_points(geometry, where)
        xs, ys = [q[0] for q in pts], [q[1] for q in pts]
        box = BoxL0(min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))
        object_type = str(props.get("objectType", props.get("object_type", "annotation"))).lower()
        out.append(
            Annotation(
                class_name=_class_name(props),
                box=box,
                is_rectangle=_is_axis_rectangle(geometry, pts),
                object_type=object_type,
                id=str(feat["id"]) if "id" in feat else None,
                properties=dict(props),
            )
        )
    return out


def box_feature(
    box: BoxL0,
    *,
    class_name: str,
    object_type: str = "detection",
    measurements: dict[str, float] | None = None,
    name: str | None = None,
    color: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """A QuPath Feature for an axis-aligned box (imported as a RectangleROI)."""
    x0, y0 = round(box.x_l0, 2), round(box.y_l0, 2)
    x1, y1 = round(box.x1_l0, 2), round(box.y1_l0, 2)
    rgb = list(color or class_color(class_name))
    props: dict[str, Any] = {
        "objectType": object_type,
        "classification": {"name": class_name, "color": rgb},
    }
    if measurements:
        props["measurements"] = {
            k: float(v) for k, v in measurements.items() if math.isfinite(float(v))
        }
    if name:
        props["name"] = name
    return {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
        },
        "properties": props,
    }


def write_feature_collection(path: str | os.PathLike[str], features: list[dict[str, Any]]) -> Path:
    """Write a FeatureCollection atomically."""
    return write_json_atomic(path, {"type": "FeatureCollection", "features": features})
