"""The review session: the state of Iterative Patch Selection, kept in a folder.

``<session>/session.json`` (versioned, written atomically) holds the classes with their colours
and similarity thresholds, the experiment's patch size (fixed by its first prototype), the
prototypes, every suggestion sent to the user (by id), the user's decisions (approved positives,
negatives per class, approved and rejected background) and which images were reviewed. Images
never reviewed are the ones noisy patches are mined from. ``dense`` records the search rule the
session's suggestions were made with (object rule ``true``, patch rule ``false``; see
:class:`~simsearch_wsi.search.engine.SearchSettings`), which its later suggestions keep unless
asked otherwise; a file without it that has suggestions is from before the object rule was the
default and keeps the patch rule.

Conventions (what a QuPath user does, see README):

* classified rectangle annotations are **prototypes**;
* suggestions come back as detections of their class; leaving one in place approves it (when its
  similarity is at or above the class threshold), giving it the class
  :data:`~simsearch_wsi.qupath.geojson.REJECTED_CLASS` rejects it (a negative of the class it
  was suggested for), giving it another project class relabels it, deleting it leaves it
  unreviewed;
* background candidates come back under :data:`~simsearch_wsi.qupath.geojson.BACKGROUND_CLASS`
  and are confirmed or rejected the same way.

Suggestions are matched to the reviewed file by their GeoJSON ``id`` (QuPath 0.4+ keeps it), or,
for files without ids, by name and box. Ingesting the same review twice changes nothing; a
decision that contradicts an earlier one is applied and reported as a conflict.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from simsearch_wsi.core.atomic import write_json_atomic
from simsearch_wsi.core.errors import ConfigError, MetadataError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.features.extractor import ProgressFn
from simsearch_wsi.io.base import ImageSource
from simsearch_wsi.qupath.geojson import (
    BACKGROUND_CLASS,
    REJECTED_CLASS,
    RESERVED_CLASSES,
    Annotation,
    class_color,
)
from simsearch_wsi.search.engine import (
    DEFAULT_THRESHOLD,
    ImageOpener,
    SimSearch,
    SuggestResult,
    prototypes_from_annotations,
)
from simsearch_wsi.search.similarity import Prototype
from simsearch_wsi.search.validation import (
    check_box,
    check_session_document,
    prototype_from_annotation,
)

SESSION_FILE = "session.json"
SESSION_VERSION = 1

Decision = Literal["positive", "negative", "background", "not_background"]


@dataclass(frozen=True)
class PatchRecord:
    """A patch the session knows: where it is, its class, and where it came from."""

    id: str
    image: str
    class_name: str
    box: tuple[float, float, float, float]  # x_l0, y_l0, width_l0, height_l0
    similarity: float | None = None
    name: str | None = None

    @property
    def box_l0(self) -> BoxL0:
        return BoxL0(*self.box)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PatchRecord:
        return cls(
            str(d["id"]),
            str(d["image"]),
            str(d["class_name"]),
            tuple(float(v) for v in d["box"]),  # type: ignore[arg-type]
            None if d.get("similarity") is None else float(d["similarity"]),
            d.get("name"),
        )


@dataclass
class ReviewReport:
    """What one ``review`` changed."""

    image: str
    approved: int = 0
    rejected: int = 0
    background: int = 0
    not_background: int = 0
    relabelled: int = 0
    below_threshold: int = 0
    unreviewed: int = 0
    new_prototypes: int = 0
    unchanged: int = 0
    conflicts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _image_key(path: str | os.PathLike[str]) -> str:
    return str(Path(path).resolve())


def _box_key(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    return tuple(round(v) for v in box)  # type: ignore[return-value]


class Session:
    """A review session folder. Open with :meth:`create` or :meth:`open`; call :meth:`save`."""

    def __init__(self, root: Path, data: dict[str, Any]) -> None:
        self.root = root
        self.created: str = data["created"]
        self.patch_size_l0: tuple[float, float] | None = (
            tuple(data["patch_size_l0"]) if data.get("patch_size_l0") else None  # type: ignore[assignment]
        )
        self.classes: dict[str, dict[str, Any]] = dict(data.get("classes", {}))
        self.prototypes = [PatchRecord.from_dict(d) for d in data.get("prototypes", [])]
        self.suggestions = {d["id"]: PatchRecord.from_dict(d) for d in data.get("suggestions", [])}
        self.decisions: dict[str, tuple[Decision, PatchRecord]] = {
            d["record"]["id"]: (d["decision"], PatchRecord.from_dict(d["record"]))
            for d in data.get("decisions", [])
        }
        self.reviewed_images: list[str] = list(data.get("reviewed_images", []))
        self.reviews: list[dict[str, Any]] = list(data.get("reviews", []))
        #: the search rule of the session's suggestions (None: none made yet); a file written
        #: before the rule was recorded made its suggestions with the patch rule, the default then
        self.dense: bool | None = data.get("dense", False if self.suggestions else None)
        #: the candidates the session's suggestions were asked from (``SearchSettings.candidates``,
        #: ``auto`` included: :func:`candidates_asked`; None: none made yet); a file written
        #: before it was recorded made them on the grid
        self.candidates: str | None = data.get("candidates", "grid" if self.suggestions else None)

    # --- files ----------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike[str], *, exist_ok: bool = False) -> Session:
        """A new session in ``root`` (created); an existing one is opened when ``exist_ok``."""
        path = Path(root)
        if (path / SESSION_FILE).exists():
            if exist_ok:
                return cls.open(path)
            raise ConfigError(
                f"{path}: a session already exists here; open it or pick a new folder"
            )
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path}: exists and is not a folder; pick a folder for the session")
        path.mkdir(parents=True, exist_ok=True)
        session = cls(path, {"created": datetime.now(UTC).isoformat(timespec="seconds")})
        session.save()
        return session

    @classmethod
    def open_or_new(cls, root: str | os.PathLike[str]) -> Session:
        """The session in ``root``, or a new one that is written (folder and file) only by its
        first :meth:`save`: a command that fails before then leaves nothing behind (issue 30)."""
        path = Path(root)
        if (path / SESSION_FILE).exists():
            return cls.open(path)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path}: exists and is not a folder; pick a folder for the session")
        return cls(path, {"created": datetime.now(UTC).isoformat(timespec="seconds")})

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> Session:
        path = Path(root)
        file = path / SESSION_FILE
        if not file.is_file():
            raise ConfigError(
                f"{path}: not a review session (no {SESSION_FILE}); create one with "
                "`simsearch-wsi suggest ... --session DIR`"
            )
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise MetadataError(f"{file}: session file is corrupt ({reason})") from None
        data = check_session_document(data, file, version=SESSION_VERSION)
        try:
            return cls(path, data)
        except (KeyError, TypeError, ValueError) as exc:
            raise MetadataError(f"{file}: session file is incomplete ({exc})") from exc

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SESSION_VERSION,
            "created": self.created,
            "patch_size_l0": list(self.patch_size_l0) if self.patch_size_l0 else None,
            "classes": self.classes,
            "prototypes": [asdict(p) for p in self.prototypes],
            "suggestions": [asdict(s) for s in self.suggestions.values()],
            "decisions": [{"decision": d, "record": asdict(r)} for d, r in self.decisions.values()],
            "reviewed_images": self.reviewed_images,
            "reviews": self.reviews,
            "dense": self.dense,
            "candidates": self.candidates,
        }

    def save(self) -> Path:
        """Write ``session.json`` atomically (creating the folder of a new session)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return write_json_atomic(self.root / SESSION_FILE, self.to_dict())

    # --- classes and prototypes -------------------------------------------------------------
    def _add_class(self, name: str) -> None:
        if name in RESERVED_CLASSES:
            raise ConfigError(
                f"class name {name!r} is reserved by simsearch_wsi; rename that class"
            )
        if name not in self.classes:
            self.classes[name] = {"color": list(class_color(name)), "threshold": DEFAULT_THRESHOLD}

    def set_thresholds(self, thresholds: dict[str, float]) -> None:
        """Set class thresholds (similarities); all are checked before any changes."""
        for name, value in thresholds.items():
            if name not in self.classes:
                raise ConfigError(
                    f"threshold for unknown class {name!r}; session classes: {list(self.classes)}"
                )
            if not math.isfinite(value):
                raise ConfigError(f"threshold for {name!r} must be a finite number")
        for name, value in thresholds.items():
            self.classes[name]["threshold"] = float(value)

    @property
    def thresholds(self) -> dict[str, float]:
        return {name: float(c["threshold"]) for name, c in self.classes.items()}

    def add_prototypes(self, image: str | os.PathLike[str], prototypes: Sequence[Prototype]) -> int:
        """Add prototypes drawn on ``image`` (duplicates ignored); the first fixes the patch size.
        Returns how many were new."""
        key = _image_key(image)
        known = {(p.image, p.class_name, _box_key(p.box)) for p in self.prototypes}
        new = 0
        for p in prototypes:
            self._add_class(p.class_name)
            box = (p.box.x_l0, p.box.y_l0, p.box.width_l0, p.box.height_l0)
            if (key, p.class_name, _box_key(box)) in known:
                continue
            if self.patch_size_l0 is None:
                self.patch_size_l0 = (p.box.width_l0, p.box.height_l0)
            digest = hashlib.sha256(f"{key}|{p.class_name}|{_box_key(box)}".encode()).hexdigest()
            self.prototypes.append(PatchRecord(f"proto-{digest[:16]}", key, p.class_name, box))
            known.add((key, p.class_name, _box_key(box)))
            new += 1
        return new

    def check_prototypes_on(self, image: ImageSource) -> None:
        """Refuse (:class:`ConfigError` naming the session file) a saved prototype drawn on
        ``image`` that does not lie inside it, e.g. one saved by an older version."""
        key = _image_key(image.path)
        for p in self.prototypes:
            if p.image == key:
                check_box(
                    p.box_l0,
                    label=f"{self.root / SESSION_FILE}: prototype {p.id} ({p.class_name})",
                    image_size_l0=image.dimensions,
                    advice="remove it from the session file (or start a new session)",
                )

    def all_prototypes(self) -> list[Prototype]:
        """Every prototype, with the image it was drawn on."""
        return [Prototype(p.class_name, p.box_l0, p.image) for p in self.prototypes]

    def images(self) -> list[str]:
        """Every image the session names (prototypes, suggestions, decisions), sorted."""
        images = {p.image for p in self.prototypes}
        images |= {r.image for r in self.suggestions.values()}
        images |= {r.image for _, r in self.decisions.values()}
        return sorted(images)

    def labelled_boxes(self, image: str | os.PathLike[str]) -> list[BoxL0]:
        """Boxes on ``image`` the user has labelled (prototypes and decisions)."""
        key = _image_key(image)
        boxes = [p.box_l0 for p in self.prototypes if p.image == key]
        boxes += [r.box_l0 for _, r in self.decisions.values() if r.image == key]
        return boxes

    # --- suggestions and reviews ------------------------------------------------------------
    def record_suggestions(self, image: str | os.PathLike[str], result: SuggestResult) -> None:
        """Remember what was sent to the user (by id) so a review can be matched to it."""
        key = _image_key(image)
        for sid, s in result.all_suggestions():
            self.suggestions[sid] = PatchRecord(
                sid,
                key,
                s.class_name,
                (s.box.x_l0, s.box.y_l0, s.box.width_l0, s.box.height_l0),
                s.similarity,
                f"{s.class_name} #{s.rank}",
            )

    def _match(self, a: Annotation, key: str) -> PatchRecord | None:
        if a.id is not None and a.id in self.suggestions:
            rec = self.suggestions[a.id]
            return rec if rec.image == key else None
        ab = _box_key((a.box.x_l0, a.box.y_l0, a.box.width_l0, a.box.height_l0))
        for rec in self.suggestions.values():  # files without ids: name + box
            if (
                rec.image == key
                and rec.name == a.properties.get("name")
                and _box_key(rec.box) == ab
            ):
                return rec
        return None

    def ingest_review(
        self,
        image: str | os.PathLike[str],
        annotations: Sequence[Annotation],
        *,
        source: str,
        image_size_l0: tuple[int, int] | None = None,
        where: str | None = None,
        thresholds: dict[str, float] | None = None,
    ) -> ReviewReport:
        """Apply the user's decisions on ``image`` (see module docstring).

        ``thresholds`` (class -> similarity): where the user left each class's threshold (a
        live threshold in QuPath); saved in the session before deciding, so a suggestion kept
        in place is approved when its similarity is at or above its class's new threshold.
        Suggestions below their class's threshold that were not sent back (a viewer hid them)
        are not counted as unreviewed.

        New prototypes (classified rectangles that are not suggestions) are checked as
        ``suggest`` checks them (:func:`~simsearch_wsi.search.validation.prototype_from_annotation`;
        inside the image when ``image_size_l0`` is given) before anything changes: a refused
        object raises :class:`ConfigError` (naming ``where``, default ``source``) and leaves
        the session as it was. ``source`` is recorded with the review."""
        key = _image_key(image)
        matched: list[tuple[Annotation, PatchRecord]] = []
        new_protos: list[Prototype] = []
        for n, a in enumerate(annotations):  # check everything first: refusing changes nothing
            rec = self._match(a, key)
            if rec is not None:
                matched.append((a, rec))
                continue
            proto = prototype_from_annotation(
                a, n, where=where or source, image_size_l0=image_size_l0
            )
            if proto is not None:
                new_protos.append(proto)
        if thresholds:
            self.set_thresholds(thresholds)
        report = ReviewReport(image=key)
        thresholds = self.thresholds
        seen: set[str] = set()
        for a, rec in matched:
            seen.add(rec.id)
            decision, final = self._decide(rec, a.class_name, thresholds, report)
            if decision is None:
                continue
            previous = self.decisions.get(rec.id)
            if previous == (decision, final):
                report.unchanged += 1
                continue
            if previous is not None:
                report.conflicts.append(
                    f"{rec.name or rec.id}: was {previous[0]} ({previous[1].class_name}), now "
                    f"{decision} ({final.class_name})"
                )
            self.decisions[rec.id] = (decision, final)
            if decision == "positive":
                if final.class_name != rec.class_name:
                    report.relabelled += 1
                else:
                    report.approved += 1
            elif decision == "negative":
                report.rejected += 1
            elif decision == "background":
                report.background += 1
            else:
                report.not_background += 1
        report.unreviewed = sum(
            1
            for r in self.suggestions.values()
            if r.image == key
            and r.id not in seen
            and r.id not in self.decisions
            and not self._below_threshold(r, thresholds)
        )
        report.new_prototypes = self.add_prototypes(key, new_protos)
        if key not in self.reviewed_images:
            self.reviewed_images.append(key)
        self.reviews.append(
            {
                "image": key,
                "source": source,
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
                "report": report.to_dict(),
            }
        )
        return report

    @staticmethod
    def _below_threshold(rec: PatchRecord, thresholds: dict[str, float]) -> bool:
        """A class suggestion under its class's threshold (a floor candidate nobody was shown)."""
        if rec.class_name == BACKGROUND_CLASS or rec.similarity is None:
            return False
        return rec.similarity < thresholds.get(rec.class_name, DEFAULT_THRESHOLD)

    def _decide(
        self,
        rec: PatchRecord,
        new_class: str | None,
        thresholds: dict[str, float],
        report: ReviewReport,
    ) -> tuple[Decision | None, PatchRecord]:
        if rec.class_name == BACKGROUND_CLASS:
            if new_class == BACKGROUND_CLASS:
                return "background", rec
            if new_class == REJECTED_CLASS:
                return "not_background", rec
        elif new_class == REJECTED_CLASS:
            return "negative", rec
        elif new_class == rec.class_name:
            sim = rec.similarity if rec.similarity is not None else math.inf
            if sim < thresholds.get(rec.class_name, DEFAULT_THRESHOLD):
                report.below_threshold += 1
                return None, rec
            return "positive", rec
        if new_class and new_class not in RESERVED_CLASSES:
            self._add_class(new_class)
            return "positive", PatchRecord(
                rec.id, rec.image, new_class, rec.box, rec.similarity, rec.name
            )
        return None, rec  # unclassified: nothing decided

    def add_decision(
        self, image: str | os.PathLike[str], decision: Decision, *, class_name: str, box: BoxL0
    ) -> str:
        """Record a labelled patch without a suggestion round trip (scripted labelling, a
        simulated user); ``class_name`` is the patch's class, for a negative the class it is
        not, for background decisions ``background``. Returns the decision's id."""
        if decision not in ("positive", "negative", "background", "not_background"):
            raise ConfigError(f"unknown decision {decision!r}")
        if decision in ("positive", "negative"):
            self._add_class(class_name)
        key = _image_key(image)
        b = (box.x_l0, box.y_l0, box.width_l0, box.height_l0)
        digest = hashlib.sha256(f"{key}|{decision}|{class_name}|{_box_key(b)}".encode())
        rid = f"label-{digest.hexdigest()[:16]}"
        self.decisions[rid] = (decision, PatchRecord(rid, key, class_name, b))
        return rid

    # --- views ------------------------------------------------------------------------------
    def examples(self, decision: Decision) -> list[PatchRecord]:
        return [r for d, r in self.decisions.values() if d == decision]

    def summary(self) -> dict[str, Any]:
        per_class = {
            name: {
                "color": c["color"],
                "threshold": c["threshold"],
                "prototypes": sum(1 for p in self.prototypes if p.class_name == name),
                "positives": sum(1 for r in self.examples("positive") if r.class_name == name),
                "negatives": sum(1 for r in self.examples("negative") if r.class_name == name),
            }
            for name, c in self.classes.items()
        }
        images = sorted(
            {p.image for p in self.prototypes} | {r.image for r in self.suggestions.values()}
        )
        return {
            "session": str(self.root),
            "version": SESSION_VERSION,
            "patch_size_l0": list(self.patch_size_l0) if self.patch_size_l0 else None,
            "classes": per_class,
            "background": len(self.examples("background")),
            "not_background": len(self.examples("not_background")),
            "suggestions_sent": len(self.suggestions),
            "images": images,
            "reviewed_images": self.reviewed_images,
            "unreviewed_images": [i for i in images if i not in self.reviewed_images],
            "reviews": len(self.reviews),
        }


# --- the review-loop operations the CLI and the server share ---------------------------------
def suggest_with_session(
    search: SimSearch,
    image: ImageSource,
    *,
    session: Session | None,
    annotations: Sequence[Annotation] | None,
    where: str,
    thresholds: dict[str, float],
    n_background: int = 0,
    engine_lock: AbstractContextManager[Any] | None = None,
    open_image: ImageOpener | None = None,
    progress: ProgressFn | None = None,
    floor: float | None = None,
    heatmap: bool = False,
    heatmap_downsample: float | None = None,
    dense: bool | None = None,
    candidates: str | None = None,
) -> SuggestResult:
    """Suggestions on ``image`` from the prototypes in ``annotations`` and, with a session, from
    every saved prototype (saved thresholds apply; given ones are saved). Records what was sent
    in the session and saves it. ``annotations=None`` uses the session's prototypes only.

    ``open_image`` opens the images of saved prototypes drawn on other images (default
    :func:`simsearch_wsi.io.open_image`; the server passes one that enforces its folders).
    ``floor``: candidates down to that similarity too (:meth:`SimSearch.suggest`), recorded
    like the others; a review decides on them with the thresholds it is given. ``heatmap``:
    the result carries the class heat maps, at least ``heatmap_downsample`` level-0 pixels per
    pixel when given (:meth:`SimSearch.suggest`). ``dense``: the search rule (object rule
    ``True``, patch rule ``False``); ``None``: the session's (:attr:`Session.dense`), else the
    search's settings; the rule used is recorded in the session. ``candidates``
    (``SearchSettings.candidates``) likewise: given, the session's, else the search's."""
    if annotations is None and session is None:
        raise ConfigError(
            "suggest needs annotations (prototype rectangles), or a session with saved prototypes"
        )
    prototypes = (
        prototypes_from_annotations(annotations, image, where=where)
        if annotations is not None
        else []
    )
    patch_size = None
    if session is not None:
        session.check_prototypes_on(image)
        session.add_prototypes(image.path, prototypes)
        session.set_thresholds(thresholds)
        thresholds = session.thresholds
        prototypes = session.all_prototypes()
        patch_size = session.patch_size_l0
        if not prototypes:
            raise ConfigError(
                f"{session.root}: the session has no prototypes yet; send annotations with "
                "classified rectangles"
            )
    asked = candidates_asked(search, session, candidates=candidates)
    search = with_rule(search, dense, session, candidates=candidates)
    with engine_lock or nullcontext():
        result = search.suggest(
            image,
            prototypes,
            thresholds=thresholds,
            n_background=n_background,
            avoid=session.labelled_boxes(image.path) if session is not None else (),
            patch_size_l0=patch_size,
            open_image=open_image,
            progress=progress,
            floor=floor,
            heatmap=heatmap,
            heatmap_downsample=heatmap_downsample,
        )
    if session is not None:
        session.record_suggestions(result.image, result)
        session.dense = result.object_size_l0 is not None
        session.candidates = asked
        session.save()
    return result


def with_rule(
    search: SimSearch,
    dense: bool | None,
    session: Session | None,
    *,
    candidates: str | None = None,
) -> SimSearch:
    """``search`` with the search rule ``dense`` when given, else the session's recorded one,
    else as it is (``dense_fine`` only with the object rule); ``candidates`` likewise (object
    candidates only with the object rule: a patch-rule session keeps grid candidates unless
    they are given, and so does a search with ``dense_fine``, a form of the grid)."""
    rule = dense if dense is not None else session.dense if session is not None else None
    fine = search.settings.dense_fine and rule is not False
    where = (
        candidates
        if candidates is not None
        else session.candidates
        if session is not None and rule is not False and not fine
        else None
    )
    changes: dict[str, Any] = {}
    if rule is not None:
        changes.update(dense=rule, dense_fine=search.settings.dense_fine and rule)
    if where is not None:
        changes["candidates"] = where
    elif rule is False:
        changes["candidates"] = "grid"
    return search.with_settings(**changes) if changes else search


def candidates_asked(
    search: SimSearch, session: Session | None, *, candidates: str | None = None
) -> str:
    """What a session records as its candidates: those asked for (``candidates`` when given,
    else the session's record, else ``search``'s setting), not what ``auto`` resolved to on
    one image nor the grid a patch-rule run is held to, so a resumed session decides each
    image as it was asked to (:func:`with_rule` applies the record)."""
    if candidates is not None:
        return candidates
    if session is not None and session.candidates is not None:
        return session.candidates
    return search.settings.candidates


def background_with_session(
    search: SimSearch,
    image: ImageSource,
    *,
    session: Session,
    n: int,
    engine_lock: AbstractContextManager[Any] | None = None,
    open_image: ImageOpener | None = None,
    progress: ProgressFn | None = None,
    dense: bool | None = None,
    candidates: str | None = None,
) -> SuggestResult:
    """Only background candidates (new ids), away from everything labelled; recorded and saved.
    ``open_image``, ``dense`` and ``candidates`` as for :func:`suggest_with_session`."""
    prototypes = session.all_prototypes()
    if not prototypes:
        raise ConfigError(f"{session.root}: the session has no prototypes yet; run suggest first")
    session.check_prototypes_on(image)
    asked = candidates_asked(search, session, candidates=candidates)
    search = with_rule(search, dense, session, candidates=candidates)
    with engine_lock or nullcontext():
        result = search.suggest(
            image,
            prototypes,
            thresholds=session.thresholds,
            n_background=n,
            avoid=session.labelled_boxes(image.path),
            patch_size_l0=session.patch_size_l0,
            open_image=open_image,
            progress=progress,
        )
    result = dataclasses.replace(result, suggestions=[], ids=[])
    session.record_suggestions(result.image, result)
    session.dense = result.object_size_l0 is not None
    session.candidates = asked
    session.save()
    return result
