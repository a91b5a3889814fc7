"""``serve``: the local HTTP server the QuPath scripts talk to, with the engine kept warm."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from simsearch_wsi.cli.argtypes import int_at_least, positive_float
from simsearch_wsi.cli.engine import build_search
from simsearch_wsi.cli.exitcodes import EXIT_OK
from simsearch_wsi.core.errors import ConfigError

if TYPE_CHECKING:
    from simsearch_wsi.cli.options import Subparsers


def register(sub: Subparsers, engine: argparse.ArgumentParser) -> None:
    """Add ``serve`` to the commands."""
    p_srv = sub.add_parser(
        "serve",
        parents=[engine],
        help="run the local HTTP server the QuPath scripts talk to",
        description="Serve the review loop (suggest, review, background, session) and long "
        "jobs (embed, train, predict) over HTTP with models and feature caches kept warm. Binds "
        "to loopback; any other host needs a token. Only images, sessions, models and output "
        "folders under --allow folders are used.",
    )
    p_srv.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    p_srv.add_argument(
        "--port", type=int_at_least(1), default=8765, help="port (default: %(default)s)"
    )
    p_srv.add_argument(
        "--allow",
        action="append",
        metavar="DIR",
        help="folder whose images, sessions, models and outputs may be used (repeatable; "
        "default: the current folder)",
    )
    p_srv.add_argument(
        "--token",
        default=None,
        help="require 'Authorization: Bearer TOKEN' (or set SIMSEARCH_WSI_TOKEN)",
    )
    p_srv.add_argument(
        "--max-body-mb",
        type=positive_float,
        default=32.0,
        help="largest request body in MB (default: %(default)s)",
    )
    p_srv.add_argument(
        "--job-workers",
        type=int_at_least(1),
        default=1,
        help="background jobs run at once (default: %(default)s)",
    )
    p_srv.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from simsearch_wsi.server.app import create_app, is_loopback, serve

    token = args.token or os.environ.get("SIMSEARCH_WSI_TOKEN") or None
    if not is_loopback(args.host) and not token:
        raise ConfigError(
            f"--host {args.host} exposes the server beyond this machine: also pass --token "
            "SECRET (or set SIMSEARCH_WSI_TOKEN), and put the same token in the QuPath scripts"
        )
    roots = [Path(p).resolve() for p in (args.allow or [os.getcwd()])]
    for root in roots:
        if not root.is_dir():
            raise ConfigError(f"--allow {root}: not a folder; pass folders holding your images")
    search = build_search(args)
    app = create_app(
        search,
        allowed_roots=roots,
        token=token,
        max_body_bytes=int(args.max_body_mb * 2**20),
        job_workers=args.job_workers,
    )
    print(
        f"simsearch-wsi: serving http://{args.host}:{args.port}/api/v1 (docs at /api/v1/docs); "
        f"images and sessions allowed under: {', '.join(str(r) for r in roots)}; "
        f"token {'required' if token else 'not required (loopback only)'}; Ctrl-C stops",
        file=sys.stderr,
    )
    serve(app, host=args.host, port=args.port)
    return EXIT_OK
