"""The names a training run is configured by, in one place and without importing torch (the
CLI's parser and the server's schemas offer them before any engine code loads)."""

from __future__ import annotations

#: which data a run trains on (SimSearch's strategies)
STRATEGIES = ("pos", "pos+neg", "pos+selflearn", "pos+neg+selflearn")
DEFAULT_STRATEGY = "pos+neg+selflearn"
#: schedules (:meth:`simsearch_wsi.train.fit.TrainConfig.preset_config`)
PRESETS = ("quick", "fast", "paper")
#: what the model's head reads: ``search`` = the search head on the similarity search's own
#: normalised window vectors (:mod:`simsearch_wsi.search.probe`), ``trunk`` = the fine-tuned
#: trunk's pooled features (the paper's stages), ``tuned-search`` = the paper's stages
#: fine-tune the trunk, then the search head is fitted on the fine-tuned trunk's normalised
#: window vectors (the bundle keeps that trunk), ``ensemble`` = the search heads on both
#: trunks (fine-tuned and the search's), their probabilities combined per window (a product of
#: experts; the bundle keeps both trunks), ``auto`` = ``ensemble`` where every class has at
#: least 5 labelled patches and the images are brightfield RGB, else ``trunk`` (with a judge,
#: ``TrainConfig.judge_windows``: the heads compared on held-out patches, experimental)
HEAD_INPUTS = ("auto", "ensemble", "search", "trunk", "tuned-search")
DEFAULT_HEAD_INPUT = "auto"
#: what the CLI's ``--head-input`` and the server's ``head_input`` say about the choices
HEAD_INPUT_HELP = (
    "trunk: fine-tune the trunk (the paper's stages) and train a linear head; search: a head on "
    "the search's own window vectors (seconds, no trunk training); tuned-search: fine-tune the "
    "trunk, then the search head on its window vectors; ensemble: the search heads on the "
    "fine-tuned and on the search's trunk, their probabilities combined; auto: ensemble "
    "where every class has at least 5 labelled patches on brightfield RGB, else trunk "
    "(docs/evaluation.md, 'Training study')"
)

#: the ensemble's similarity expert (``TrainConfig.similarity_expert``): its weight in the product
#: of experts against 1 per search head. Off by default: at 0.25 (chosen on the study's dev
#: cases) it ranks better (held-out PR-AUC up on 7 of 8 cases) but writes worse detections and
#: regions at the thresholds (IoU 0.386 -> 0.326, down on 6 of 8; the demo's 0.50 -> 0.47)
#: (docs/evaluation.md, "the search's similarity as a third expert")
DEFAULT_SIMILARITY_EXPERT = 0.0
#: the weight the study's dev cases chose for it
CHOSEN_SIMILARITY_EXPERT = 0.25
#: what the CLI's ``--similarity-expert`` and the server's ``similarity_expert`` say
SIMILARITY_EXPERT_HELP = (
    "ensemble only (refused with search, trunk, tuned-search; unused where auto trains "
    "another head): the weight of a third expert, the search's own similarity to the "
    "prototypes, against 1 per search head; 0 = off. 0.25 ranked better on the training "
    "study's held-out cases but wrote worse regions at the thresholds (docs/evaluation.md, "
    "'the search's similarity as a third expert')"
)

#: the suffixes of a head spec (:func:`parse_head_spec`) and the TrainConfig fields they set
HEAD_SPEC_SUFFIXES = {"u": "unlabelled_windows", "j": "judge_windows"}


def parse_head_spec(spec: str) -> tuple[str, dict[str, int]]:
    """``NAME[:uN][:jN]`` (the benchmarks' way to name a training variant) as the name and the
    :class:`~simsearch_wsi.train.fit.TrainConfig` changes of its suffixes: ``uN`` =
    ``unlabelled_windows``, ``jN`` = ``judge_windows``. Raises ``ConfigError`` on another
    suffix or a count that is not a non-negative integer."""
    from simsearch_wsi.core.errors import ConfigError

    name, *suffixes = spec.split(":")
    changes: dict[str, int] = {}
    for suffix in suffixes:
        field = HEAD_SPEC_SUFFIXES.get(suffix[:1])
        if field is None or not suffix[1:].isdigit():
            raise ConfigError(
                f"{spec!r}: unknown suffix {suffix!r}; use uN (unlabelled windows) or jN "
                "(judge windows), e.g. tuned-search:u256"
            )
        changes[field] = int(suffix[1:])
    return name, changes
