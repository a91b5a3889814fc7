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
