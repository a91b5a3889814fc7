"""Shared fixtures: seeded synthetic images generated per session, and the real sample data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _offline() -> Iterator[None]:
    """Tests never reach for the network: ``--weights auto`` skips the ImageNet download (the
    CLI's switch), so it resolves to cached ImageNet weights or the embedded trunk."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIMSEARCH_WSI_OFFLINE", "1")
        yield


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
    from simsearch_wsi.review.session import Session
    from simsearch_wsi.review.simulate import label_from_truth

    def build(root: Path) -> Session:
        return label_from_truth(Session.create(root), small_slides[0], background=3, seed=0)

    return build


@pytest.fixture()
def labelled_session(tmp_path, make_labelled_session):  # type: ignore[no-untyped-def]
    """A fresh labelled review session (see ``make_labelled_session``)."""
    return make_labelled_session(tmp_path / "session")


@pytest.fixture()
def tiny_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every training preset shrunk to seconds (for CLI, server and QuPath-script tests): one
    step per contrastive stage, a few linear epochs, and 60 % held out so that even 3 patches
    per class give validation metrics."""
    from simsearch_wsi.train.fit import StageConfig, TrainConfig

    real = TrainConfig.preset_config

    def tiny(name: str = "fast", *, strategy: str = "pos+neg+selflearn") -> TrainConfig:
        return real(name, strategy=strategy).replace(
            selflearn=StageConfig(1, 16, 1e-3, max_steps_per_epoch=1),
            supcon=StageConfig(1, 16, 1e-3, temperature=0.07, max_steps_per_epoch=1),
            linear=StageConfig(5, 32, 1e-2),
            noisy_per_class=8,
            background_per_image=8,
            linear_views=2,
            val_fraction=0.6,
        )

    monkeypatch.setattr(TrainConfig, "preset_config", tiny)


# --- inference: an untrained model bundle -------------------------------------------------------
TINY_BUNDLE_CLASSES = ("ring", "cluster", "stripes", "background")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, small_slides) -> Path:  # type: ignore[no-untyped-def]
    """An untrained model bundle (.zip; seeded random trunk and head, classes ring, cluster,
    stripes and background, thresholds 0.3) for 48 px patches on the small slides; built in
    seconds, for tests of what runs a model (predict over the CLI, the server, the scripts)."""
    from simsearch_wsi.infer.dense import untrained_bundle
    from simsearch_wsi.io import open_image
    from simsearch_wsi.train.bundle import save_bundle

    with open_image(small_slides[1].path) as image:
        bundle = untrained_bundle([image], classes=TINY_BUNDLE_CLASSES, threshold=0.3, seed=2)
    return save_bundle(tmp_path_factory.mktemp("bundle") / "tiny model.zip", bundle)
