"""Limits of the search's options, in one place and without importing torch (the CLI's parser
and the server's schemas check them before any engine code loads)."""

from __future__ import annotations

#: a similarity (cosine): thresholds, the suggest floor
SIMILARITY_MIN, SIMILARITY_MAX = -1.0, 1.0
#: display cap: a heat map's longest side (pixels); a finer grid is coarsened to fit
MAX_HEATMAP_SIDE_PX = 8192
#: the suggest option asking for heat maps at a coarser grid (level-0 pixels per pixel)
HEATMAP_DOWNSAMPLE_HELP = (
    "heat maps of at least this many level-0 pixels per heat-map pixel (default: one pixel "
    "per window, the windows' pitch); a heat map is coarsened further, by the maximum of the "
    f"windows each pixel covers, to stay within {MAX_HEATMAP_SIDE_PX} pixels a side"
)
#: the candidates of a search (``--candidates``, the server's ``candidates``,
#: ``SearchSettings.candidates``)
CANDIDATE_RULES: tuple[str, ...] = ("grid", "objects", "auto")
CANDIDATES_HELP = (
    "where suggestions come from. grid: the local maxima of the similarity maps, "
    "at the scale of the median prototype box. objects: one candidate per separate object found "
    "in the image (a threshold on the channels' mean intensity; brightfield: darkness), each "
    "compared at its own size, the box the object's (for separate objects of varying size, "
    "e.g. cells of a plate; needs the object rule). auto: objects when every "
    "prototype box outlines one object found of about its size (separate objects), else grid. A "
    "review session keeps the candidates it was asked for (auto stays auto, decided on each "
    "image) unless given"
)
#: the search rule option (``--dense``/``--no-dense``, the server's ``dense``): its help, one
#: wording for the CLI and the server
DENSE_HELP = (
    "the search rule. The object rule (on, the default): the prototype boxes outline the "
    "objects (nuclei, cells, motifs), which may touch; one suggestion per object, half an "
    "object apart, boxes of the object's size (the median prototype box), features pooled over "
    "half of it. The patch rule (off, the default before): the first prototype's box is the "
    "patch, suggestions a patch apart, boxes of the patch (docs/evaluation.md measured the "
    "object rule as good or better on every case). A review session keeps the rule its "
    "suggestions were made with unless one is given; a session saved before the rule was "
    "recorded that has suggestions keeps the patch rule"
)
