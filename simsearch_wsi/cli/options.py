"""Options that several commands share, each declared once here, and how their values are read.

The engine options (trunk weights and backbone, feature normalisation, device, feature cache,
tile and batch size, autocast, channels, pixel size, all tiles or the foreground's, the search
rule) come as one parent parser, :func:`engine_parser`; a command that runs the trunk without the
whole engine adds the ones it takes with :meth:`Option.add`. So do the commands sharing the patch
size, seed, training preset, per-class thresholds and the plate selection (``--wells``,
``--fields``). A command may word an option's help (or default) for itself; the option's name,
type and limits are the ones declared here. :func:`parse_device` and :func:`parse_thresholds`
read the values of ``--device`` and ``--threshold`` for every command.
Options of one command only sit next to that command's handler.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from simsearch_wsi.cli.argtypes import float_between, int_at_least, positive_float
from simsearch_wsi.core.errors import ConfigError
from simsearch_wsi.search.choices import (
    CANDIDATE_RULES,
    CANDIDATES_HELP,
    DENSE_HELP,
    HEATMAP_DOWNSAMPLE_HELP,
    SIMILARITY_MAX,
    SIMILARITY_MIN,
)

if TYPE_CHECKING:
    import torch

    #: what ``ArgumentParser.add_subparsers`` returns; commands add their parsers to it
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

_KEEP: Any = object()  # Option.add: keep the declared default


@dataclass(frozen=True)
class Option:
    """A command-line option: its flag and ``add_argument`` settings."""

    flag: str
    settings: Mapping[str, Any]
    #: other spellings accepted for the flag (an old name kept working)
    aliases: tuple[str, ...] = ()

    def add(
        self,
        parser: argparse.ArgumentParser | argparse._ArgumentGroup,
        *,
        help: str | None = None,
        default: Any = _KEEP,
        metavar: str | None = None,
    ) -> None:
        """Add the option to ``parser``, with this command's own help, default or metavar."""
        settings = dict(self.settings)
        if help is not None:
            settings["help"] = help
        if default is not _KEEP:
            settings["default"] = default
        if metavar is not None:
            settings["metavar"] = metavar
        parser.add_argument(self.flag, *self.aliases, **settings)


def _option(flag: str, *aliases: str, **settings: Any) -> Option:
    return Option(flag, settings, aliases)


# --- engine -------------------------------------------------------------------------------------
#: ``--weights`` values that name weights rather than a file
WEIGHTS_NAMES = ("auto", "imagenet", "embedded", "random")

#: the smallest ``--tile-size``: tile cores under 64 analysis pixels are mostly halo
MIN_TILE_SIZE = 64

WEIGHTS = _option(
    "--weights",
    default="auto",
    help="trunk weights: auto (ImageNet from the torch cache, else downloaded when online, "
    "else the embedded self-supervised trunk; SIMSEARCH_WSI_OFFLINE=1 skips the download), "
    "imagenet (download if missing), embedded, random, or a .pth file "
    "(default: %(default)s)",
)
FEATURE_NORM = _option(
    "--feature-norm",
    default=None,
    metavar="{none,standardize,whiten}",
    help="feature normalisation before the cosine, each image with its own statistics "
    "(default: the one docs/evaluation.md measured best, see simsearch_wsi.features.norm)",
)
BACKBONE = _option(
    "--backbone", default="resnet18-l3", help="registered backbone (default: %(default)s)"
)
DEVICE = _option(
    "--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: %(default)s)"
)
CACHE = _option(
    "--cache",
    default=None,
    help="feature cache folder (default: ~/.cache/simsearch_wsi/features)",
)
TILE_SIZE = _option(
    "--tile-size",
    type=int_at_least(MIN_TILE_SIZE),
    default=1024,
    help="tile side in analysis pixels, a multiple of 16 (default: %(default)s)",
)
BATCH_SIZE = _option(
    "--batch-size",
    type=int_at_least(1),
    default=4,
    help="tiles per batch (default: %(default)s)",
)
NO_AUTOCAST = _option(
    "--no-autocast",
    action="store_true",
    help="run the trunk in float32 (default: bf16 on CPU, fp16 on CUDA)",
)
CHANNELS = _option(
    "--channels",
    default=None,
    help="comma-separated channel names or indices to use (default: all)",
)
MPP = _option(
    "--mpp",
    type=positive_float,
    default=None,
    help="level-0 pixel size in um/px when the file has none",
)

ALL_TILES = _option(
    "--all-tiles",
    action="store_true",
    help="embed every tile of the image instead of only those the foreground (tissue / cell) "
    "mask finds; for images where foreground detection is not wanted or misses objects",
)

#: the search rule: object (``--dense``, the default of ``SearchSettings.dense``) or patch
#: (``--no-dense``); ``None`` when not given, so the default lives in ``SearchSettings`` and a
#: review session's recorded rule applies (``review.session.suggest_with_session``)
DENSE = _option(
    "--dense",
    action=argparse.BooleanOptionalAction,
    default=None,
    help=DENSE_HELP + " (default: the object rule)",
)

#: where suggestions come from (``SearchSettings.candidates``); ``None`` when not given, so
#: the default lives in ``SearchSettings`` and a review session's recorded choice applies
CANDIDATES = _option(
    "--candidates",
    choices=CANDIDATE_RULES,
    default=None,
    help=CANDIDATES_HELP + " (default: auto)",
)

#: redo images a run in the same output folder finished before (``predict``, ``cohort``);
#: ``--overwrite`` is the spelling ``cohort`` had
FORCE = _option(
    "--force",
    "--overwrite",
    action="store_true",
    help="redo images already finished in the output folder (also spelled --overwrite)",
)

MANIFEST = _option(
    "--manifest", default=None, metavar="FILE.csv", help="CSV with a path column + metadata"
)

ENGINE = (
    WEIGHTS,
    FEATURE_NORM,
    BACKBONE,
    DEVICE,
    CACHE,
    TILE_SIZE,
    BATCH_SIZE,
    NO_AUTOCAST,
    CHANNELS,
    MPP,
    ALL_TILES,
    DENSE,
    CANDIDATES,
)


def engine_parser() -> argparse.ArgumentParser:
    """The parent parser (``parents=[...]``) of the commands that build a search engine."""
    engine = argparse.ArgumentParser(add_help=False)
    group = engine.add_argument_group("engine")
    for option in ENGINE:
        option.add(group)
    return engine


# --- plates -------------------------------------------------------------------------------------
WELLS = _option(
    "--wells",
    default=None,
    metavar="A1,B12",
    help="OME-Zarr plates: only these wells, comma-separated (default: every well); a single "
    "field can also be given by path, PLATE/A/1/0 (row/column/field)",
)
FIELDS = _option(
    "--fields",
    default=None,
    metavar="0,1",
    help="OME-Zarr plates: only these fields of each well, 0 = the first (default: every field)",
)


def add_plate_selection(parser: argparse.ArgumentParser) -> None:
    """``--wells`` and ``--fields``: which fields of the plates among the images a command
    runs on (read by :func:`simsearch_wsi.cli.inputs.images_of`)."""
    group = parser.add_argument_group("plates")
    WELLS.add(group)
    FIELDS.add(group)


# --- patch size, training, thresholds -----------------------------------------------------------
PATCH_SIZE_PX = _option("--patch-size-px", type=positive_float, default=64.0)
PATCH_SIZE_UM = _option("--patch-size-um", type=positive_float, default=None)

SEED = _option("--seed", type=int, default=0, help="seed (default: %(default)s)")
PRESET = _option(
    "--preset", default="fast", choices=["quick", "fast", "paper"], help="training preset"
)
THRESHOLD = _option(
    "--threshold", action="append", metavar="CLASS=P", help="confidence threshold, repeatable"
)

# --- the interactive loop (suggest; the server's SuggestRequest mirrors them) -------------------
FLOOR = _option(
    "--floor",
    type=float_between(SIMILARITY_MIN, SIMILARITY_MAX),
    default=None,
    metavar="SIMILARITY",
    help="also return the candidates down to this similarity (below the thresholds)",
)
HEATMAP = _option(
    "--heatmap", default=None, metavar="PATH.png", help="also write the class heat maps"
)
HEATMAP_DOWNSAMPLE = _option(
    "--heatmap-downsample",
    type=positive_float,
    default=None,
    metavar="D",
    help=HEATMAP_DOWNSAMPLE_HELP,
)


def add_patch_size(parser: argparse.ArgumentParser, what: str) -> None:
    """``--patch-size-px`` or ``--patch-size-um``: the size of ``what``, which fixes the scale."""
    size = parser.add_mutually_exclusive_group()
    PATCH_SIZE_PX.add(
        size,
        help=f"{what} in level-0 pixels; fixes the analysis scale (default: %(default)s)",
    )
    PATCH_SIZE_UM.add(size, help=f"{what} in micrometres")


# --- reading values -----------------------------------------------------------------------------
def parse_device(name: str, *, allow_auto: bool = True, here: bool = True) -> torch.device:
    """The torch device ``--device name`` asks for: ``cpu`` or ``cuda[:N]``.

    ``allow_auto``: ``auto`` means CUDA when available, else the CPU. ``here``: the device must
    exist on this machine; ``False`` where it runs elsewhere (Dask workers of ``--scheduler``),
    so only the name is checked.
    """
    import torch

    choices = "auto, cpu or cuda[:N]" if allow_auto else "cpu or cuda[:N]"
    if allow_auto and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use {choices}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: not supported; use {choices}")
    if device.type == "cuda" and here:
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA device is available; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}"
            )
    return device


def parse_thresholds(items: Sequence[str]) -> dict[str, float]:
    """``--threshold CLASS=VALUE`` values (repeatable) as ``{class: value}``."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = float(value)
            if not math.isfinite(out[name]):
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"--threshold {item!r}: expected CLASS=VALUE, e.g. --threshold Tumor=0.6"
            ) from None
    return out
