"""Local Dask clusters for cohort runs: worker processes set up for PyTorch image work.

The CLI decides to start one (``cohort`` without ``--scheduler``) and calls
:func:`start_local_cluster`; :mod:`simsearch_wsi.cohort.run` only ever uses the client it is given.

Two settings differ from Dask's defaults, both measured (docs/benchmarks.md):

* Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which fixes glibc's
  allocation thresholds: every large temporary array is then mapped and unmapped afresh, and a
  slide ran 12-26 % slower. Our workers keep glibc's adaptive default.
* Each worker gets its share of the cores for torch (``torch.set_num_threads``), and with GPUs
  one worker per GPU sees only that GPU (``CUDA_VISIBLE_DEVICES``) and declares the Dask
  resource ``GPU=1`` that GPU tasks ask for.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from simsearch_wsi.core.errors import ConfigError

__all__ = ["gpu_worker_specs", "import_distributed", "set_torch_threads", "start_local_cluster"]

#: the local scheduler: no dashboard, and its HTTP endpoint (which Dask starts even without a
#: dashboard, by default on port 8787, warning when that is taken) on a free port of loopback
SCHEDULER_OPTIONS = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}

#: Dask configuration for the worker processes this module starts
WORKER_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def import_distributed() -> Any:
    """The ``distributed`` module, or a :class:`ConfigError` saying how to install it."""
    try:
        return importlib.import_module("distributed")  # untyped library
    except ImportError:
        raise ConfigError(
            "cohort runs on Dask distributed, which is not installed; install it with "
            "pip install 'simsearch_wsi[distributed]'"
        ) from None


def set_torch_threads(n: int) -> int:
    """Run on each worker: torch's intra-op threads (at least 1); returns the number set."""
    import torch

    torch.set_num_threads(max(1, n))
    return int(torch.get_num_threads())


def gpu_worker_specs(gpus: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Dask ``SpecCluster`` workers for a local GPU cluster: one nanny-managed process per GPU,
    which sees only that GPU (``CUDA_VISIBLE_DEVICES``) and declares the ``GPU`` resource."""
    distributed = import_distributed()
    return {
        f"gpu{g}": {
            "cls": distributed.Nanny,
            "options": {
                "nthreads": 1,
                "resources": {"GPU": 1},
                "env": {"CUDA_VISIBLE_DEVICES": str(g)},
                "dashboard_address": None,
            },
        }
        for g in gpus
    }


def start_local_cluster(n_workers: int, *, cores: int, gpus: Sequence[int] = ()) -> tuple[Any, Any]:
    """A local cluster and its client: ``n_workers`` single-threaded worker processes sharing
    ``cores`` for torch or, with ``gpus``, one worker per GPU. The caller closes both
    (client first)."""
    import dask

    distributed = import_distributed()
    with dask.config.set(WORKER_CONFIG):
        if gpus:
            n_workers = len(gpus)
            cluster = distributed.SpecCluster(
                workers=gpu_worker_specs(gpus),
                scheduler={"cls": distributed.Scheduler, "options": SCHEDULER_OPTIONS},
            )
        else:
            cluster = distributed.LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                scheduler_kwargs=SCHEDULER_OPTIONS,
            )
    client = distributed.Client(cluster)
    client.run(set_torch_threads, max(1, cores // n_workers))
    return client, cluster
