"""Background jobs: a registry of jobs run in a thread pool owned by the app.

A job kind is a runner ``fn(ctx: JobContext) -> result`` (JSON-serialisable). A job reports
progress through its :class:`JobContext`; cancelling makes the next progress report raise
inside the job, which stops the library call that reported it (caches stay resumable).
"""

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Literal

from simsearch_wsi.core.errors import ConfigError, SimSearchError
from simsearch_wsi.server.errors import ApiError, one_line

__all__ = ["Job", "JobContext", "JobManager", "JobRunner", "JobState"]

JobState = Literal["queued", "running", "done", "failed", "cancelled"]

_MAX_FINISHED_JOBS = 200
_logger = logging.getLogger(__name__)


class _JobCancelledError(Exception):
    """Raised inside a job (from its progress callback) once cancellation was requested."""


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


@dataclasses.dataclass(kw_only=True)
class Job:
    """One background job. Read it through :meth:`JobManager.describe` (thread-safe)."""

    id: str
    kind: str
    params: dict[str, Any]
    state: JobState = "queued"
    stage: str = "queued"
    done: int = 0
    total: int = 0
    error: str | None = None
    result: Any = None
    created: float = dataclasses.field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_event: threading.Event = dataclasses.field(default_factory=threading.Event)
    future: Future[None] | None = None


class JobContext:
    """What a running job sees: progress reports (which raise once cancelled) and its params."""

    def __init__(self, job: Job, lock: threading.Lock) -> None:
        self._job = job
        self._lock = lock

    @property
    def params(self) -> dict[str, Any]:
        return self._job.params

    @property
    def cancel_requested(self) -> bool:
        return self._job.cancel_event.is_set()

    def check_cancelled(self) -> None:
        """Raise the private cancellation exception when the job was cancelled."""
        if self._job.cancel_event.is_set():
            raise _JobCancelledError

    def progress(self, stage: str, done: int, total: int) -> None:
        """Record progress; a :data:`~simsearch_wsi.features.extractor.ProgressFn`. Raises when
        cancelled, which stops the library call that reported it (caches stay resumable)."""
        self.check_cancelled()
        self.report(stage, done, total)

    def report(self, stage: str, done: int, total: int) -> None:
        """Record progress without checking for cancellation: for the last report of a job
        whose work is already committed (a job that wrote its output is done, not cancelled).
        Positional like :meth:`progress`, whose signature it shares."""
        with self._lock:
            self._job.stage, self._job.done, self._job.total = stage, int(done), int(total)


JobRunner = Callable[[JobContext], Any]


class JobManager:
    """Background jobs of one app, run in its own thread pool.

    Routes submit runners with :meth:`submit` (``embed``, ``train`` and ``predict``; others
    plug in the same way). Finished jobs beyond the last 200 are forgotten.
    """

    def __init__(self, workers: int = 1) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ConfigError(f"job_workers must be a positive integer, got {workers!r}")
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="simsearch-job")
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}

    def submit(self, kind: str, runner: JobRunner, *, params: dict[str, Any] | None = None) -> Job:
        """Queue ``runner`` as a job of ``kind``; ``params`` are shown with the job."""
        job = Job(id=uuid.uuid4().hex, kind=kind, params=dict(params or {}))
        with self._lock:
            self._prune()
            self._jobs[job.id] = job
            job.future = self._executor.submit(self._run, job, runner)
        return job

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if j.finished is not None]
        for j in sorted(finished, key=lambda j: j.created)[
            : max(0, len(finished) - _MAX_FINISHED_JOBS)
        ]:
            del self._jobs[j.id]

    def _run(self, job: Job, runner: JobRunner) -> None:
        with self._lock:
            if job.cancel_event.is_set():
                job.state, job.stage, job.finished = "cancelled", "cancelled", time.time()
                return
            job.state, job.stage, job.started = "running", "starting", time.time()
        ctx = JobContext(job, self._lock)
        try:
            result = runner(ctx)
        except _JobCancelledError:
            with self._lock:
                job.state, job.finished = "cancelled", time.time()
        except Exception as exc:
            if isinstance(exc, SimSearchError | ApiError):
                _logger.info("job %s (%s) failed: %s", job.id, job.kind, exc)
            else:
                _logger.error("job %s (%s) failed", job.id, job.kind, exc_info=exc)
            name = exc.code if isinstance(exc, ApiError) else type(exc).__name__
            with self._lock:
                job.state, job.finished = "failed", time.time()
                job.error = f"{name}: {one_line(str(exc))}"
        else:
            with self._lock:
                job.state, job.result, job.finished = "done", result, time.time()

    def get(self, job_id: str) -> Job:
        """The job ``job_id``; a 404 error when there is none."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(
                404,
                "job_not_found",
                message=f"no job {job_id!r} (finished jobs are forgotten on restart)",
            )
        return job

    def describe(self, job: Job) -> dict[str, Any]:
        """The job as the protocol's JSON object."""
        with self._lock:
            return {
                "id": job.id,
                "kind": job.kind,
                "state": job.state,
                "progress": {"stage": job.stage, "done": job.done, "total": job.total},
                "error": job.error,
                "result": job.result,
                "params": job.params,
                "cancel_requested": job.cancel_event.is_set(),
                "created": _iso(job.created),
                "started": _iso(job.started),
                "finished": _iso(job.finished),
            }

    def jobs(self) -> list[Job]:
        """Every job still known, oldest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job now, or ask a running one to stop at its next progress report.

        Raises a 409 error for a job that already finished (done or failed)."""
        job = self.get(job_id)
        with self._lock:
            if job.state in ("done", "failed"):
                raise ApiError(
                    409,
                    "job_finished",
                    message=f"job {job_id} already {job.state}; nothing to cancel",
                )
            job.cancel_event.set()
            if job.state == "queued" and job.future is not None and job.future.cancel():
                job.state, job.stage, job.finished = "cancelled", "cancelled", time.time()
        return job

    def shutdown(self) -> None:
        """Cancel everything and wait for running jobs to stop (at their next progress)."""
        with self._lock:
            for job in self._jobs.values():
                job.cancel_event.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for job in self._jobs.values():
                if job.state == "queued":
                    job.state, job.stage, job.finished = "cancelled", "cancelled", time.time()
