"""A simulated user: labels a review session from a synthetic slide's ground truth.

Used by tests, benchmarks and evaluations to stand in for a pathologist. Per class, the first
objects become prototypes, the next ones approved suggestions, and objects of other classes
rejected suggestions (negatives) of that class; background boxes away from every object are
confirmed background.
"""

from __future__ import annotations

from simsearch_wsi.review.session import Session
from simsearch_wsi.search.similarity import Prototype
from simsearch_wsi.synthetic import SyntheticSlide


def label_from_truth(
    session: Session,
    slide: SyntheticSlide,
    *,
    prototypes_per_class: int = 1,
    positives_per_class: int = 2,
    negatives_per_class: int = 1,
    background: int = 3,
    seed: int = 0,
    reviewed: bool = True,
) -> Session:
    """Add prototypes and decisions on ``slide`` to ``session`` (saved); ``reviewed`` marks the
    slide as reviewed, so it is not mined for noisy patches."""
    p, n = prototypes_per_class, positives_per_class
    session.add_prototypes(
        slide.path,
        [Prototype(c, o.box) for c in slide.classes for o in slide.objects_of(c)[:p]],
    )
    for c in slide.classes:
        for o in slide.objects_of(c)[p : p + n]:
            session.add_decision(slide.path, "positive", class_name=c, box=o.box)
        others = [o for o in slide.objects if o.class_name != c][:negatives_per_class]
        for o in others:
            session.add_decision(slide.path, "negative", class_name=c, box=o.box)
    size = slide.objects[0].width_l0 if slide.objects else 48.0
    for box in slide.background_boxes(background, seed=seed, size_l0=size):
        session.add_decision(slide.path, "background", class_name="background", box=box)
    key = str(slide.path.resolve())
    if reviewed and key not in session.reviewed_images:
        session.reviewed_images.append(key)
    session.save()
    return session
