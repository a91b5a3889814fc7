"""The simulated user (simsearch_wsi.eval.user): hand-computed reviews, prototype picking,
background review, region (mask) truth, and a whole review recorded in a session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.core.geometry import BoxL0
from simsearch_wsi.eval.truth import GroundTruth
from simsearch_wsi.eval.user import (
    BACKGROUND_MAX_FRACTION,
    REGION_FRACTION,
    TruthImage,
    UserConfig,
    claimed_by_prototypes,
    pick_prototypes,
    review_background,
    review_ranked,
    square_box,
)
from simsearch_wsi.search.similarity import Prototype, Suggestion


def sug(name: str, cx: float, cy: float, sim: float) -> Suggestion:
    return Suggestion(name, square_box((cx, cy), 20), sim, 0)


def truth_of(**centres: list[tuple[float, float]]) -> GroundTruth:
    return GroundTruth.from_centres(
        {k: np.array(v, dtype=float).reshape(-1, 2) for k, v in centres.items()}
    )


@pytest.fixture()
def two_images(tmp_path: Path) -> list[TruthImage]:
    a = truth_of(ring=[(100, 100), (300, 100), (500, 100)], disc=[(700, 100)])
    b = truth_of(ring=[(100, 400)], disc=[])
    return [TruthImage(tmp_path / "a.tiff", a), TruthImage(tmp_path / "b.tiff", b)]


def test_review_stops_before_the_n_plus_first_wrong(two_images: list[TruthImage]) -> None:
    ranked = [
        (0, sug("ring", 102, 98, 0.95)),  # ring 0
        (1, sug("ring", 105, 405, 0.90)),  # ring on image b
        (0, sug("ring", 700, 100, 0.85)),  # a disc: wrong 1
        (0, sug("ring", 301, 100, 0.80)),  # ring 1
        (0, sug("ring", 99, 101, 0.75)),  # ring 0 again (taken): wrong 2
        (0, sug("ring", 500, 100, 0.70)),  # ring 2, below the stop for N = 1
    ]
    approved, flagged, threshold = review_ranked(
        ranked, two_images, class_name="ring", negatives=1, radius_l0=10
    )
    assert [s.similarity for _, s in approved] == [0.95, 0.90, 0.80]
    assert [s.similarity for _, s in flagged] == [0.85]
    assert threshold == 0.80  # the last suggestion kept
    # N = 0: the threshold stops just above the first wrong suggestion
    approved, flagged, threshold = review_ranked(
        ranked, two_images, class_name="ring", negatives=0, radius_l0=10
    )
    assert len(approved) == 2 and flagged == [] and threshold == 0.90
    # N large: every correct suggestion is approved, every wrong one flagged
    approved, flagged, threshold = review_ranked(
        ranked, two_images, class_name="ring", negatives=10, radius_l0=10
    )
    assert len(approved) == 4 and len(flagged) == 2 and threshold == 0.70


def test_review_distance_is_the_matching_radius(two_images: list[TruthImage]) -> None:
    ranked = [(0, sug("ring", 110, 100, 0.9)), (0, sug("ring", 300, 111, 0.8))]
    approved, flagged, _ = review_ranked(
        ranked, two_images, class_name="ring", negatives=5, radius_l0=10
    )
    assert len(approved) == 1 and len(flagged) == 1  # 10 px is in, 11 px is out


def test_review_skips_suggestions_on_prototype_objects(two_images: list[TruthImage]) -> None:
    ranked = [(0, sug("ring", 100, 100, 0.99)), (0, sug("ring", 700, 100, 0.5))]
    approved, flagged, threshold = review_ranked(
        ranked, two_images, class_name="ring", negatives=0, radius_l0=10, claimed={(0, 0)}
    )
    assert approved == [] and flagged == [] and threshold is None


def test_review_of_a_class_without_suggestions(two_images: list[TruthImage]) -> None:
    nothing = review_ranked([], two_images, class_name="ring", negatives=3, radius_l0=10)
    assert nothing == ([], [], None)


def test_region_classes_are_judged_by_area(tmp_path: Path) -> None:
    labels = np.zeros((100, 100), dtype=np.uint8)
    labels[:, :50] = 1  # Epithelium on the left half, Stroma top right
    labels[:50, 50:] = 2
    truth = GroundTruth.from_region_mask(labels, classes=("Epithelium", "Stroma"), downsample=2)
    assert truth.is_region_class("Stroma") and truth.n_objects() == 0
    assert truth.mask_fraction(BoxL0(0, 0, 100, 200), "Epithelium") == 1.0
    assert truth.mask_fraction(BoxL0(50, 0, 100, 100), "Epithelium") == pytest.approx(0.5)
    assert truth.mask_fraction(BoxL0(100, 100, 100, 100)) == 0.0  # bottom right: unlabelled
    assert truth.mask_fraction(BoxL0(500, 500, 10, 10)) == 0.0  # off the mask
    images = [TruthImage(tmp_path / "ihc.tiff", truth)]
    ranked = [
        (0, Suggestion("Stroma", BoxL0(120, 10, 40, 40), 0.9, 1)),  # all Stroma
        (0, Suggestion("Stroma", BoxL0(120, 10, 40, 40), 0.85, 2)),  # regions repeat freely
        (0, Suggestion("Stroma", BoxL0(10, 10, 40, 40), 0.8, 3)),  # Epithelium: wrong
        (0, Suggestion("Stroma", BoxL0(80, 10, 40, 40), 0.7, 4)),  # half Stroma: correct
    ]
    assert REGION_FRACTION == 0.5
    approved, flagged, threshold = review_ranked(
        ranked, images, class_name="Stroma", negatives=1, radius_l0=5
    )
    assert [s.rank for _, s in approved] == [1, 2, 4] and [s.rank for _, s in flagged] == [3]
    assert threshold == 0.7
    # background: confirmed only where (almost) nothing is labelled
    bg = [Suggestion("background", BoxL0(150, 150, 40, 40), 0.1, 1)]
    edge = [Suggestion("background", BoxL0(90, 110, 40, 40), 0.1, 2)]  # 1/4 on Epithelium
    assert review_background(bg, truth, radius_l0=5) == (bg, [])
    assert BACKGROUND_MAX_FRACTION < 0.25
    assert review_background(edge, truth, radius_l0=5) == ([], edge)


def test_background_review_uses_boxes_and_points() -> None:
    truth = GroundTruth.from_centres(
        {"ring": [(100.0, 100.0)], "dot": [(400.0, 400.0)]},
        boxes_l0={"ring": [(80.0, 80.0, 40.0, 40.0)]},  # the dot is a point only
    )
    on_box = Suggestion("background", BoxL0(115, 115, 20, 20), 0.0, 1)
    near_point = Suggestion("background", BoxL0(420, 400, 20, 20), 0.0, 2)  # centre 430,410
    clear = Suggestion("background", BoxL0(200, 200, 20, 20), 0.0, 3)
    confirmed, flagged = review_background([on_box, near_point, clear], truth, radius_l0=35)
    assert confirmed == [clear] and flagged == [on_box, near_point]


def test_pick_prototypes_is_seeded_and_without_replacement(two_images: list[TruthImage]) -> None:
    protos, taken = pick_prototypes(
        two_images, ["ring"], per_class=4, patch_size_l0=48, rng=np.random.default_rng(0)
    )
    assert len(protos) == 4 and taken["ring"] == {(0, 0), (0, 1), (0, 2), (1, 0)}
    assert {p.box.width_l0 for p in protos} == {48}
    assert {p.image for p in protos} == {im.key for im in two_images}
    again, _ = pick_prototypes(
        two_images, ["ring"], per_class=2, patch_size_l0=48, rng=np.random.default_rng(7)
    )
    same, _ = pick_prototypes(
        two_images, ["ring"], per_class=2, patch_size_l0=48, rng=np.random.default_rng(7)
    )
    assert again == same
    with pytest.raises(ConfigError, match="fewer than the 5 prototypes"):
        pick_prototypes(
            two_images, ["ring"], per_class=5, patch_size_l0=48, rng=np.random.default_rng(0)
        )


def test_given_prototypes_claim_their_objects(two_images: list[TruthImage]) -> None:
    key = two_images[0].key
    protos = [Prototype("ring", square_box((302, 99), 48), image=key)]
    assert claimed_by_prototypes(protos, two_images, classes=["ring", "disc"], radius_l0=10) == {
        "ring": {(0, 1)},
        "disc": set(),
    }
    with pytest.raises(ConfigError, match="not among the classes"):
        claimed_by_prototypes(
            [Prototype("star", square_box((0, 0), 8), image=key)],
            two_images,
            classes=["ring"],
            radius_l0=1,
        )
    with pytest.raises(ConfigError, match="not on a review image"):
        claimed_by_prototypes(
            [Prototype("ring", square_box((0, 0), 8), image="/elsewhere.tiff")],
            two_images,
            classes=["ring"],
            radius_l0=1,
        )


def test_user_config_rejects_nonsense() -> None:
    with pytest.raises(ConfigError, match="prototypes per class"):
        UserConfig(prototypes_per_class=0)
    with pytest.raises(ConfigError, match=">= 0"):
        UserConfig(negatives_per_class=-1)


def test_simulated_review_records_a_session(tmp_path: Path, small_slides) -> None:  # type: ignore[no-untyped-def]
    """A whole review on a real (synthetic) slide with the search: prototypes, decisions and
    thresholds land in the session, and approved suggestions are on true objects."""
    from simsearch_wsi.eval.metrics import paper_match_radius_l0
    from simsearch_wsi.eval.truth import truth_from_synthetic
    from simsearch_wsi.eval.user import simulate_review
    from simsearch_wsi.features.backbones import build_trunk
    from simsearch_wsi.features.cache import FeatureCache
    from simsearch_wsi.features.extractor import FeatureExtractor
    from simsearch_wsi.io import open_image
    from simsearch_wsi.review.session import Session
    from simsearch_wsi.search.engine import SimSearch

    trunk, spec, info = build_trunk("resnet18-l3", "random", seed=0)
    search = SimSearch(FeatureExtractor(trunk, spec, info), FeatureCache(tmp_path / "cache"))
    slide = small_slides[0]
    images = [TruthImage(slide.path, truth_from_synthetic(slide))]
    session = Session.create(tmp_path / "session")
    outcome = simulate_review(
        search,
        session,
        images=images,
        classes=("ring", "cluster"),
        config=UserConfig(prototypes_per_class=2, negatives_per_class=2, background=4),
        patch_size_l0=48,
        radius_l0=paper_match_radius_l0(48),
        rng=np.random.default_rng(3),
        open_image=open_image,
    )
    assert outcome.prototypes == {"ring": 2, "cluster": 2}
    assert all(0 <= outcome.flagged[c] <= 2 for c in ("ring", "cluster"))
    reopened = Session.open(tmp_path / "session")
    assert len(reopened.all_prototypes()) == 4
    assert reopened.thresholds == pytest.approx(outcome.thresholds)
    assert images[0].key in reopened.reviewed_images
    positives = reopened.examples("positive")
    negatives = reopened.examples("negative")
    assert len(positives) == sum(outcome.approved.values())
    assert len(negatives) == sum(outcome.flagged.values())
    radius = paper_match_radius_l0(48)
    for record in positives:
        centres = images[0].truth.centres(record.class_name)
        cx, cy = record.box_l0.center_l0
        assert np.min(np.hypot(centres[:, 0] - cx, centres[:, 1] - cy)) <= radius
    assert outcome.background + outcome.not_background > 0
    assert len(reopened.examples("background")) == outcome.background


def test_given_prototypes_reach_the_session_and_cover_every_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prototypes given with an unresolved path are stored under the image's key; a class with
    no prototype is a clear error before anything runs."""
    from types import SimpleNamespace

    from simsearch_wsi.eval.user import simulate_review
    from simsearch_wsi.review.session import Session

    monkeypatch.chdir(tmp_path)
    image = TruthImage(tmp_path / "a.tiff", truth_of(ring=[(100, 100)], disc=[(300, 300)]))
    calls: list[list[Prototype]] = []

    def suggest(img: object, protos: list[Prototype], **kwargs: object) -> object:
        calls.append(list(protos))
        return SimpleNamespace(suggestions=[], background=[])

    class Opened:
        def __enter__(self) -> Opened:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    search = SimpleNamespace(suggest=suggest)
    kwargs = {
        "config": UserConfig(1, 0, 0),
        "patch_size_l0": 48.0,
        "radius_l0": 10.0,
        "rng": np.random.default_rng(0),
        "open_image": lambda path: Opened(),
    }
    relative = Prototype("ring", square_box((100, 100), 48), image="a.tiff")
    session = Session.create(tmp_path / "s1")
    outcome = simulate_review(
        search,  # type: ignore[arg-type]
        session,
        images=[image],
        classes=("ring",),
        prototypes=[relative],
        **kwargs,  # type: ignore[arg-type]
    )
    assert outcome.prototypes == {"ring": 1}
    assert [p.image for p in session.all_prototypes()] == [image.key]
    assert calls and calls[0][0].image == image.key
    with pytest.raises(ConfigError, match=r"no prototype given for class\(es\) \['disc'\]"):
        simulate_review(
            search,  # type: ignore[arg-type]
            Session.create(tmp_path / "s2"),
            images=[image],
            classes=("ring", "disc"),
            prototypes=[relative],
            **kwargs,  # type: ignore[arg-type]
        )
