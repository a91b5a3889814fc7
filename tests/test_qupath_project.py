"""paquo-based QuPath project access: guarded, with clear errors when QuPath is missing.

The round trip through a real .qpproj needs a QuPath installation, which these machines cannot
have (QuPath is in no registry they reach): those tests skip with that reason. The guard is
tested everywhere.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from simsearch_wsi.qupath.project import QuPathUnavailableError, read_project, write_objects


def _paquo_with_qupath() -> bool:
    try:
        import paquo.projects  # noqa: F401
    except ImportError:
        return False
    except ValueError:  # paquo installed, no QuPath
        return False
    return True


def test_missing_paquo_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "paquo", None)  # makes `import paquo...` raise ImportError
    monkeypatch.setitem(sys.modules, "paquo.projects", None)
    with pytest.raises(QuPathUnavailableError, match=r"simsearch_wsi\[qupath\]"):
        read_project(tmp_path / "p.qpproj")


def test_paquo_without_qupath_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """paquo raises ValueError at import when it finds no QuPath: reported, not a traceback."""
    fake = types.ModuleType("paquo")
    fake.__path__ = []  # a package
    monkeypatch.setitem(sys.modules, "paquo", fake)
    classes = types.ModuleType("paquo.classes")
    monkeypatch.setitem(sys.modules, "paquo.classes", classes)

    class _Finder:
        def find_spec(self, name: str, path: object = None, target: object = None) -> object:
            if name == "paquo.projects":
                raise ValueError("no valid QuPath installation found")
            return None

    monkeypatch.setattr(sys, "meta_path", [_Finder(), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "paquo.projects", raising=False)
    with pytest.raises(QuPathUnavailableError, match="cannot find a QuPath installation"):
        write_objects(tmp_path / "p.qpproj", "a.svs", features=[])


@pytest.mark.skipif(
    not _paquo_with_qupath(),
    reason="needs paquo and a QuPath installation (not installable on these "
    "machines: QuPath is in no package registry they reach)",
)
def test_round_trip_through_a_real_project(tmp_path: Path) -> None:  # pragma: no cover
    from paquo.projects import QuPathProject

    from simsearch_wsi.core.geometry import BoxL0
    from simsearch_wsi.qupath.geojson import box_feature
    from simsearch_wsi.synthetic import make_synthetic_slide

    slide = make_synthetic_slide(tmp_path / "s.tiff", width=512, height=384, n_per_class=1)
    with QuPathProject(tmp_path / "proj", mode="x") as qp:
        qp.add_image(slide.path)
    feats = [
        box_feature(BoxL0(10, 10, 40, 40), class_name="ring", measurements={"similarity": 0.7})
    ]
    assert write_objects(tmp_path / "proj", slide.path, features=feats) == 1
    images = read_project(tmp_path / "proj")
    assert [a.class_name for a in images[0].annotations] == ["ring"]


class _Obj:
    def __init__(self, roi: object, path_class: object, measurements: dict[str, float]) -> None:
        self.roi, self.path_class, self.measurements = roi, path_class, measurements


class _Hierarchy:
    def __init__(self) -> None:
        self.detections: set[_Obj] = set()
        self.annotations: set[_Obj] = set()

    def add_detection(self, *, roi: object, path_class: object, measurements: dict) -> _Obj:  # type: ignore[type-arg]
        obj = _Obj(roi, path_class, measurements)
        self.detections.add(obj)
        return obj

    def add_annotation(self, *, roi: object, path_class: object, measurements: dict) -> _Obj:  # type: ignore[type-arg]
        obj = _Obj(roi, path_class, measurements)
        self.annotations.add(obj)
        return obj


def test_objects_go_in_as_detections_and_annotations_replacing_earlier_ones(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Against a stand-in for paquo's API (the real one needs QuPath): detections and
    segmentation annotations are added by their objectType, and objects of the replaced
    classes from an earlier run are removed first; other classes stay."""
    from simsearch_wsi.core.geometry import BoxL0
    from simsearch_wsi.qupath.geojson import box_feature

    image = tmp_path / "slide.tiff"
    image.write_bytes(b"")
    hierarchy = _Hierarchy()

    class _Class:
        def __init__(self, name: str, color: object = None) -> None:
            self.name, self.color = name, color

    old_ring = hierarchy.add_detection(roi=None, path_class=_Class("ring"), measurements={})
    kept = hierarchy.add_annotation(roi=None, path_class=_Class("Tumor"), measurements={})
    hierarchy.add_annotation(roi=None, path_class=_Class("ring"), measurements={})

    class _Entry:
        uri = image.as_uri()
        image_name = image.name

        def __init__(self) -> None:
            self.hierarchy = hierarchy

    class _Project:
        def __init__(self, path: Path, mode: str) -> None:
            assert mode == "r+"
            self.images = [_Entry()]

        def __enter__(self) -> _Project:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    paquo = types.ModuleType("paquo")
    paquo.__path__ = []
    projects = types.ModuleType("paquo.projects")
    projects.QuPathProject = _Project  # type: ignore[attr-defined]
    classes = types.ModuleType("paquo.classes")
    classes.QuPathPathClass = _Class  # type: ignore[attr-defined]
    for name, module in (
        ("paquo", paquo),
        ("paquo.projects", projects),
        ("paquo.classes", classes),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    features = [
        box_feature(BoxL0(0, 0, 10, 10), class_name="ring", measurements={"probability ring": 0.9}),
        box_feature(BoxL0(5, 5, 20, 20), class_name="ring", object_type="annotation"),
    ]
    assert (
        write_objects(tmp_path / "p.qpproj", image, features=features, replace_classes={"ring"})
        == 2
    )
    assert old_ring not in hierarchy.detections and kept in hierarchy.annotations
    (det,) = hierarchy.detections
    assert det.path_class.name == "ring" and det.measurements == {"probability ring": 0.9}
    assert det.roi.bounds == (0.0, 0.0, 10.0, 10.0)  # type: ignore[attr-defined]
    new = [a for a in hierarchy.annotations if a is not kept]
    assert [a.path_class.name for a in new] == ["ring"]
    assert new[0].roi.area == 400.0  # type: ignore[attr-defined]
