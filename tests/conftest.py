"""Shared fixtures: seeded synthetic images generated per session, and the real sample data."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample files of ../shared/data; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"real sample data not found at {SHARED_DATA} (only present in the project's "
            "own workspace; see shared/data/README.md)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A 3-level brightfield pyramidal TIFF with stamped motifs and its ground truth."""
    from simsearch_wsi.synthetic import make_synthetic_slide

    return make_synthetic_slide(tmp_path_factory.mktemp("slide") / "synthetic.tiff", seed=0)


@pytest.fixture(scope="session")
def fluorescence_slide(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A multichannel (DAPI, GFP, Cy5) uint16 OME-TIFF pyramid and its ground truth."""
    from simsearch_wsi.synthetic import make_fluorescence_slide

    return make_fluorescence_slide(tmp_path_factory.mktemp("fluo") / "fluo.ome.tiff", seed=1)


@pytest.fixture(scope="session")
def synthetic_plate(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A 2x3-well, 2-fields-per-well OME-Zarr HCS plate (NGFF 0.4) and its ground truth."""
    from simsearch_wsi.synthetic import make_synthetic_plate

    return make_synthetic_plate(tmp_path_factory.mktemp("plate") / "plate.ome.zarr", seed=2)


# --- training: small slides and a labelled review session ------------------------------------
SMALL_SLIDE = {"width": 1024, "height": 768, "n_per_class": 6}


@pytest.fixture(scope="session")
def small_slides(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Three small brightfield slides (seeds 0, 1, 2): labelled, held out, and unreviewed."""
    from simsearch_wsi.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("small")
    return tuple(
        make_synthetic_slide(root / f"small{seed}.tiff", seed=seed, **SMALL_SLIDE)
        for seed in (0, 1, 2)
    )


@pytest.fixture(scope="session")
def make_labelled_session(small_slides):  # type: ignore[no-untyped-def]
    """Builds a review session on slide 0 in a folder: per class 1 prototype, 2 approved
    suggestions and 1 rejected one (a motif of another class), plus 3 confirmed background
    patches; slide 0 marked reviewed."""
    from simsearch_wsi.session import Session
    from simsearch_wsi.similarity import Prototype

    slide = small_slides[0]

    def build(root: Path) -> Session:
        session = Session.create(root)
        session.add_prototypes(
            slide.path, [Prototype(c, slide.objects_of(c)[0].box) for c in slide.classes]
        )
        for c in slide.classes:
            for o in slide.objects_of(c)[1:3]:
                session.add_decision(slide.path, "positive", c, o.box)
            other = next(o for o in slide.objects if o.class_name != c)
            session.add_decision(slide.path, "negative", c, other.box)
        for box in slide.background_boxes(3, seed=0):
            session.add_decision(slide.path, "background", "background", box)
        session.reviewed_images.append(str(slide.path.resolve()))
        session.save()
        return session

    return build


@pytest.fixture()
def labelled_session(tmp_path, make_labelled_session):  # type: ignore[no-untyped-def]
    """A fresh labelled review session (see ``make_labelled_session``)."""
    return make_labelled_session(tmp_path / "session")
