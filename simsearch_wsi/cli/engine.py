"""The search engine a command runs on, built from the engine options (:mod:`.options`): trunk
and weights, device, feature cache and search settings; and the prototype patch size that the
patch-size options give for an image.

The CLI is where these are decided; the library below it takes them as arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from simsearch_wsi.cli.options import parse_device
from simsearch_wsi.core.errors import ConfigError

if TYPE_CHECKING:
    from simsearch_wsi.io import ImageSource
    from simsearch_wsi.search.engine import SimSearch


def default_cache_dir() -> Path:
    """Where features are cached without ``--cache``: under ``$XDG_CACHE_HOME`` or ~/.cache."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "simsearch_wsi" / "features"


def build_search(args: argparse.Namespace) -> SimSearch:
    """The similarity search the engine options describe (downloads weights only as asked)."""
    import torch

    from simsearch_wsi.features.backbones import build_trunk, resolve_auto_weights
    from simsearch_wsi.features.cache import FeatureCache
    from simsearch_wsi.features.extractor import FeatureExtractor
    from simsearch_wsi.search.engine import SearchSettings, SimSearch

    hub_dir = Path(torch.hub.get_dir())
    weights = args.weights
    if weights == "auto":
        # the CLI decides whether to try the network: SIMSEARCH_WSI_OFFLINE=1 never does
        offline = os.environ.get("SIMSEARCH_WSI_OFFLINE", "").strip() not in ("", "0")
        trunk, spec, info, notice = resolve_auto_weights(
            args.backbone, cache_dir=hub_dir, allow_download=not offline
        )
        if notice:
            print(f"simsearch-wsi: note: {notice}", file=sys.stderr)
    else:
        trunk, spec, info = build_trunk(
            args.backbone, weights, seed=0, cache_dir=hub_dir, allow_download=weights == "imagenet"
        )
    device = parse_device(args.device)
    extractor = FeatureExtractor(trunk, spec, info, device=device, autocast=not args.no_autocast)
    cache = FeatureCache(Path(args.cache) if args.cache else default_cache_dir())
    channels = tuple(args.channels.split(",")) if args.channels else None
    settings = SearchSettings(
        tile_size=args.tile_size,
        batch_size=args.batch_size,
        channels=channels,
        tiles="all" if getattr(args, "all_tiles", False) else "foreground",
        # --dense/--no-dense given: that rule; not given: SearchSettings' default
        **({"dense": args.dense} if getattr(args, "dense", None) is not None else {}),
        **(
            {"candidates": args.candidates} if getattr(args, "candidates", None) is not None else {}
        ),
        **({"feature_norm": args.feature_norm} if args.feature_norm else {}),
    )
    return SimSearch(extractor, cache, settings=settings)


def patch_size_l0(args: argparse.Namespace, image: ImageSource) -> float:
    """The prototype patch side in level-0 pixels of ``image`` (``--patch-size-um`` needs its
    pixel size)."""
    if args.patch_size_um is not None:
        if image.mpp is None:
            raise ConfigError(
                f"{image.path}: --patch-size-um needs the pixel size; pass --mpp or use "
                "--patch-size-px"
            )
        return float(args.patch_size_um / image.mpp)
    return float(args.patch_size_px)
