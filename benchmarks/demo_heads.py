"""The demo (``simsearch-wsi demo``) with another model head (issue 27).

``make demo`` trains with the package's defaults and prints, for the held-out synthetic slide,
the model's PR-AUC next to the search's. This runs the same demo with the training preset's
head input and search-head options replaced, so the heads can be compared on the demo's own
data and review (one head per run, each in its own output folder)::

    .venv/bin/python benchmarks/demo_heads.py trunk
    .venv/bin/python benchmarks/demo_heads.py tuned-search
    .venv/bin/python benchmarks/demo_heads.py auto:u256:j256

``HEAD[:uN][:jN]``: ``uN`` = ``TrainConfig.unlabelled_windows`` (search heads calibrated on N
unlabelled windows), ``jN`` = ``TrainConfig.judge_windows`` (``auto`` compares its heads among
N unlabelled windows). Extra arguments go to ``simsearch-wsi demo``.
"""

from __future__ import annotations

import sys
from typing import Any

from simsearch_wsi.cli.main import main
from simsearch_wsi.train.choices import parse_head_spec
from simsearch_wsi.train.fit import TrainConfig


def _patched_presets(spec: str) -> None:
    head, extra = parse_head_spec(spec)
    original = TrainConfig.preset_config.__func__  # type: ignore[attr-defined]

    def preset_config(cls: type[TrainConfig], /, name: str = "fast", **kw: Any) -> TrainConfig:
        config: TrainConfig = original(cls, name, **kw)
        return config.replace(head_input=head, **extra)

    TrainConfig.preset_config = classmethod(preset_config)  # type: ignore[method-assign,assignment]


if __name__ == "__main__":
    spec = sys.argv[1] if len(sys.argv) > 1 else "trunk"
    _patched_presets(spec)
    out = f"bench_output/demo_heads/{spec.replace(':', '-')}"
    sys.exit(main(["demo", "--out", out, *sys.argv[2:]]))
