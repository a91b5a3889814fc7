"""What the routes of one app share: the engine, the allowed paths, the locks and the jobs."""

import dataclasses

from simsearch_wsi.search.engine import SimSearch
from simsearch_wsi.server.jobs import JobManager
from simsearch_wsi.server.locks import Locks
from simsearch_wsi.server.paths import AllowedPaths

__all__ = ["ServerContext"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerContext:
    """The state of one app, handed to each router when the app is built."""

    search: SimSearch
    paths: AllowedPaths
    locks: Locks
    jobs: JobManager
    auth_required: bool
