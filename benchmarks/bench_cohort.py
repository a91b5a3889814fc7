"""Benchmark of cohort runs on Dask (issue 7): images per minute with 1 vs 2 local workers.
Results: docs/benchmarks.md.

    python benchmarks/bench_cohort.py [--images 8] [--size 2048] [--repeats 1] [--json FILE]

All configurations run in one process on the same slides and model, one after the other,
because these machines are noisy:

* ``in-process``: ``predict.predict_images`` in this process with every core for torch (no
  Dask): the baseline a cohort run is measured against;
* ``1 worker``: ``cohort.run_cohort`` on a ``LocalCluster`` of one worker process with every
  core for torch (what ``cohort --workers 1`` starts);
* ``2 workers``: two worker processes with the cores split between them (``cohort --workers 2``,
  the default);
* ``1 worker, Dask's environment``: as ``1 worker`` but with the worker environment Dask's
  nanny sets by default (``MALLOC_TRIM_THRESHOLD_=65536``), which ``cluster.start_local_cluster``
  leaves out;
* ``resume``: each cohort run again on its finished folder (every image skipped).

Images/min counts the images over the run's wall time from submitting the first task to the
written table (cluster start-up is reported separately). The model is ``infer.untrained_bundle``
(seeded random weights): timing does not depend on the weights. Slides are synthetic
brightfield slides of ``--size`` square pixels, about a third of them tissue.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from simsearch_wsi.cohort.cluster import set_torch_threads, start_local_cluster
from simsearch_wsi.cohort.run import CohortEntry, cohort_targets, run_cohort
from simsearch_wsi.infer.dense import PatchModel, untrained_bundle
from simsearch_wsi.infer.predict import PredictSettings, predict_images
from simsearch_wsi.io import open_image
from simsearch_wsi.synthetic import make_synthetic_slide
from simsearch_wsi.train.bundle import ModelBundle

CLASSES = ("ring", "cluster", "stripes", "background")


def _slides(root: Path, n: int, size: int) -> list[Path]:
    return [
        make_synthetic_slide(
            root / f"slide{i}.tiff", seed=100 + i, width=size, height=size, n_per_class=12
        ).path
        for i in range(n)
    ]


def _cohort(
    bundle: ModelBundle,
    slides: list[Path],
    out: Path,
    workers: int,
    cores: int,
    *,
    dask_environment: bool = False,
) -> dict[str, Any]:
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    if dask_environment:
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
        client.run(set_torch_threads, max(1, cores // workers))
        # the nanny exported its settings into this process's environment; take them back so
        # that later clusters start as start_local_cluster intends
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    else:
        client, cluster = start_local_cluster(workers, cores=cores)
    started = time.perf_counter() - t0
    try:
        targets = cohort_targets([CohortEntry(str(p)) for p in slides])
        t1 = time.perf_counter()
        result = run_cohort(targets, bundle, out_dir=out, client=client)
        seconds = time.perf_counter() - t1
        t2 = time.perf_counter()
        again = run_cohort(targets, bundle, out_dir=out, client=client)
        resume = time.perf_counter() - t2
    finally:
        client.close()
        cluster.close()
    assert not result.failed and all(i.status == "reused" for i in again.images)
    return {
        "workers": workers,
        "torch_threads_per_worker": max(1, cores // workers),
        "cluster_start_s": round(started, 2),
        "seconds": round(seconds, 2),
        "images_per_min": round(60 * len(slides) / seconds, 2),
        "mean_image_s": round(statistics.mean(i.seconds for i in result.images), 2),
        # the first image of each worker also imports the engine and builds the model
        "median_image_s": round(statistics.median(i.seconds for i in result.images), 2),
        "resume_seconds": round(resume, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    torch.manual_seed(0)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        slides = _slides(root, args.images, args.size)
        with open_image(slides[0]) as image:
            bundle = untrained_bundle([image], classes=CLASSES, seed=0)
        for rep in range(args.repeats):
            torch.set_num_threads(cores)
            model = PatchModel(bundle, device="cpu", autocast=True)
            t0 = time.perf_counter()
            results = predict_images(
                cohort_targets([CohortEntry(str(p)) for p in slides]),
                model,
                out_dir=root / f"inproc{rep}",
                open_image=open_image,
                settings=PredictSettings(),
            )
            seconds = time.perf_counter() - t0
            runs.append(
                {
                    "config": "in-process",
                    "repeat": rep,
                    "workers": 0,
                    "torch_threads_per_worker": cores,
                    "seconds": round(seconds, 2),
                    "images_per_min": round(60 * len(slides) / seconds, 2),
                    "mean_image_s": round(statistics.mean(r.seconds for r in results), 2),
                    "median_image_s": round(statistics.median(r.seconds for r in results), 2),
                }
            )
            print(json.dumps(runs[-1]), flush=True)
            for workers in (1, 2):
                row = _cohort(bundle, slides, root / f"w{workers}r{rep}", workers, cores)
                runs.append({"config": f"{workers} worker(s)", "repeat": rep, **row})
                print(json.dumps(runs[-1]), flush=True)
            row = _cohort(bundle, slides, root / f"d1r{rep}", 1, cores, dask_environment=True)
            runs.append({"config": "1 worker, Dask's environment", "repeat": rep, **row})
            print(json.dumps(runs[-1]), flush=True)
    report = {
        "cores": cores,
        "images": args.images,
        "size_px": args.size,
        "torch": torch.__version__,
        "runs": runs,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
