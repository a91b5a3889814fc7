"""What a prototype and a session file must be: one set of checks for suggest, review and the
server.

* :func:`prototype_from_annotation` decides whether a QuPath object is a prototype (a classified
  rectangle annotation) and refuses one that cannot be used: a reserved class, a non-finite,
  empty or absurdly large box, a box outside the image.
* :func:`check_box` is the box part of it, also used for prototypes read back from a session.
* :func:`check_session_document` checks a parsed ``session.json`` before anything uses it, so
  a damaged file fails with one line naming the file and the field rather than somewhere later.

Every message is one line; numbers are printed compactly (:func:`compact`), so a coordinate of
``1e308`` does not become 300 digits.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from simsearch_wsi.core.errors import ConfigError, MetadataError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.qupath.geojson import RESERVED_CLASSES, Annotation
from simsearch_wsi.search.choices import CANDIDATE_RULES
from simsearch_wsi.search.similarity import Prototype

__all__ = [
    "MAX_COORDINATE_L0",
    "check_box",
    "check_class_name",
    "check_session_document",
    "compact",
    "prototype_from_annotation",
    "prototypes_from_annotations",
]

#: Largest level-0 coordinate or size accepted (2**31 px: no scanner makes larger slides).
MAX_COORDINATE_L0 = float(2**31)

#: How far (level-0 pixels) a prototype may stick out of the image (QuPath rounds edges).
_EDGE_TOLERANCE_L0 = 0.5

_DECISIONS = ("positive", "negative", "background", "not_background")


def compact(value: float) -> str:
    """A number in at most 6 significant digits (``1e+308``, ``12.5``, ``1024``)."""
    return f"{value:.6g}"


def check_class_name(name: str, *, label: str) -> None:
    """Refuse a reserved class (:data:`~simsearch_wsi.qupath.geojson.RESERVED_CLASSES`) as a
    prototype class."""
    if name in RESERVED_CLASSES:
        reserved = ", ".join(repr(c) for c in RESERVED_CLASSES)
        raise ConfigError(
            f"{label}: the class {name!r} is reserved by simsearch_wsi ({reserved}) and cannot "
            "be a prototype class; give the rectangle a class of your own"
        )


def check_box(
    box: BoxL0,
    *,
    label: str,
    image_size_l0: tuple[int, int] | None = None,
    min_size_l0: float = 1.0,
    advice: str = "were the annotations drawn on another image?",
) -> None:
    """Refuse a box that cannot be a patch: non-finite or beyond :data:`MAX_COORDINATE_L0`,
    smaller than ``min_size_l0`` on a side, or (with ``image_size_l0``) not inside the image.

    Raises
    ------
    ConfigError
        one line starting with ``label``, numbers printed with :func:`compact`.
    """
    values = (box.x_l0, box.y_l0, box.width_l0, box.height_l0, box.x1_l0, box.y1_l0)
    where = f"at ({compact(box.x_l0)}, {compact(box.y_l0)}) size {compact(box.width_l0)}x" + (
        compact(box.height_l0)
    )
    if not all(math.isfinite(v) and abs(v) <= MAX_COORDINATE_L0 for v in values):
        raise ConfigError(
            f"{label} {where} has coordinates beyond any image (limit {compact(MAX_COORDINATE_L0)}"
            " px); delete or redraw that object"
        )
    if box.width_l0 < min_size_l0 or box.height_l0 < min_size_l0:
        raise ConfigError(f"{label} has zero area; draw a rectangle around an example")
    if image_size_l0 is None:
        return
    w0, h0 = image_size_l0
    tol = _EDGE_TOLERANCE_L0
    if not (
        box.intersects(BoxL0(0, 0, w0, h0))
        and box.x_l0 >= -tol
        and box.y_l0 >= -tol
        and box.x1_l0 <= w0 + tol
        and box.y1_l0 <= h0 + tol
    ):
        raise ConfigError(f"{label} {where} is not inside the image ({w0}x{h0}); {advice}")


def prototype_from_annotation(
    annotation: Annotation,
    n: int,
    *,
    where: str,
    image_size_l0: tuple[int, int] | None = None,
) -> Prototype | None:
    """The prototype ``annotation`` (object ``n`` of ``where``) is, or None when it is not one.

    A prototype is a classified, axis-aligned rectangle annotation; other objects are not
    prototypes (None). A prototype with a reserved class or a box :func:`check_box` refuses
    raises :class:`ConfigError`.
    """
    a = annotation
    if a.object_type != "annotation" or not a.is_rectangle or not a.class_name:
        return None
    label = f"{where}: prototype {n} ({a.class_name})"
    check_class_name(a.class_name, label=label)
    check_box(a.box, label=label, image_size_l0=image_size_l0)
    return Prototype(a.class_name, a.box)


def prototypes_from_annotations(
    annotations: Sequence[Annotation],
    *,
    where: str,
    image_size_l0: tuple[int, int] | None = None,
) -> list[Prototype]:
    """Every prototype of ``annotations`` (:func:`prototype_from_annotation`), possibly none."""
    protos = []
    for n, a in enumerate(annotations):
        p = prototype_from_annotation(a, n, where=where, image_size_l0=image_size_l0)
        if p is not None:
            protos.append(p)
    return protos


# --- session files -------------------------------------------------------------------------------
class _BadFieldError(Exception):
    """A field of a session document is wrong (the message says which and how)."""


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _number(v: Any, what: str) -> None:
    if not _is_number(v):
        shown = f"{v!r}"[:40]
        raise _BadFieldError(f"{what} must be a finite number, got {shown} ({type(v).__name__})")


def _text(v: Any, what: str) -> None:
    if not isinstance(v, str):
        raise _BadFieldError(f"{what} must be text, got {type(v).__name__}")


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise _BadFieldError(f"{what} must be a list, got {type(v).__name__}")
    return v


def _record(d: Any, what: str, *, prototype: bool = False) -> None:
    if not isinstance(d, dict):
        raise _BadFieldError(f"{what} must be an object, got {type(d).__name__}")
    for key in ("id", "image", "class_name"):
        if key not in d:
            raise _BadFieldError(f"{what} lacks {key!r}")
        _text(d[key], f"{what}.{key}")
    box = d.get("box")
    if not isinstance(box, list) or len(box) != 4:
        raise _BadFieldError(f"{what}.box must be [x, y, width, height]")
    for k, v in enumerate(box):
        _number(v, f"{what}.box[{k}]")
    label = f"{what} ({d['class_name']})"
    try:
        check_box(BoxL0(*(float(v) for v in box)), label=label, min_size_l0=1.0 if prototype else 0)
    except ConfigError as exc:
        raise _BadFieldError(str(exc).replace("; delete or redraw that object", "")) from None
    if d.get("similarity") is not None:
        _number(d["similarity"], f"{what}.similarity")
    if d.get("name") is not None:
        _text(d["name"], f"{what}.name")


def _check(data: Any, version: int) -> None:
    if not isinstance(data, dict):
        raise _BadFieldError(
            f"a session file holds a JSON object, not a JSON {type(data).__name__}"
        )
    if data.get("version") != version:
        raise _BadFieldError(
            f"session version {data.get('version')!r} is not supported by this simsearch_wsi "
            f"(reads version {version}); upgrade simsearch_wsi"
        )
    if "created" not in data:
        raise _BadFieldError("'created' is missing")
    _text(data["created"], "created")
    patch = data.get("patch_size_l0")
    if patch is not None:
        if not isinstance(patch, list) or len(patch) != 2:
            raise _BadFieldError("patch_size_l0 must be [width, height] or null")
        for k, v in enumerate(patch):
            _number(v, f"patch_size_l0[{k}]")
            if not 0 < float(v) <= MAX_COORDINATE_L0:
                raise _BadFieldError(
                    f"patch_size_l0[{k}] must be a positive size, got {compact(v)}"
                )
    dense = data.get("dense")
    if not (dense is None or isinstance(dense, bool)):
        raise _BadFieldError(f"dense must be true, false or null, got {json.dumps(dense)[:40]}")
    candidates = data.get("candidates")
    if not (candidates is None or candidates in CANDIDATE_RULES):
        raise _BadFieldError(
            f"candidates must be one of {', '.join(CANDIDATE_RULES)} or null, got "
            f"{json.dumps(candidates)[:40]}"
        )
    classes = data.get("classes", {})
    if not isinstance(classes, dict):
        raise _BadFieldError(f"classes must be an object, got {type(classes).__name__}")
    for name, c in classes.items():
        if name in RESERVED_CLASSES:
            raise _BadFieldError(f"class {name!r} is reserved by simsearch_wsi")
        if not isinstance(c, dict):
            raise _BadFieldError(f"classes[{name!r}] must be an object, got {type(c).__name__}")
        _number(c.get("threshold"), f"classes[{name!r}].threshold")
        color = c.get("color")
        if not (
            isinstance(color, list)
            and len(color) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in color)
        ):
            raise _BadFieldError(f"classes[{name!r}].color must be [r, g, b] with 0..255")
    for n, d in enumerate(_list(data.get("prototypes", []), "prototypes")):
        _record(d, f"prototypes[{n}]", prototype=True)
        if d["class_name"] not in classes:
            raise _BadFieldError(
                f"prototypes[{n}] has class {d['class_name']!r}, which is not in classes"
            )
    for n, d in enumerate(_list(data.get("suggestions", []), "suggestions")):
        _record(d, f"suggestions[{n}]")
    for n, d in enumerate(_list(data.get("decisions", []), "decisions")):
        if not isinstance(d, dict) or d.get("decision") not in _DECISIONS:
            raise _BadFieldError(f"decisions[{n}].decision must be one of {', '.join(_DECISIONS)}")
        _record(d.get("record"), f"decisions[{n}].record")
    for n, v in enumerate(_list(data.get("reviewed_images", []), "reviewed_images")):
        _text(v, f"reviewed_images[{n}]")
    for n, v in enumerate(_list(data.get("reviews", []), "reviews")):
        if not isinstance(v, dict):
            raise _BadFieldError(f"reviews[{n}] must be an object, got {type(v).__name__}")


def check_session_document(data: Any, file: str | Path, *, version: int) -> dict[str, Any]:
    """``data`` (a parsed ``session.json``) when it is a session document of ``version``.

    Raises
    ------
    MetadataError
        one line naming ``file`` and the field that is wrong (not an object, an unknown
        version, a threshold that is not a number, a box beyond any image, ...).
    """
    try:
        _check(data, version)
    except _BadFieldError as exc:
        raise MetadataError(
            f"{file}: not a usable session file: {exc}; fix the file or start a new session"
        ) from None
    return cast(dict[str, Any], data)
