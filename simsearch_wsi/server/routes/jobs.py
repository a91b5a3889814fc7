"""``/jobs``: list jobs, read one, cancel one; and the 202 answer of a submitted job."""

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from simsearch_wsi.server.context import ServerContext
from simsearch_wsi.server.jobs import Job
from simsearch_wsi.server.protocol import API_PREFIX
from simsearch_wsi.server.schemas import ERROR_RESPONSES, JobInfo, JobList

__all__ = ["job_created", "router"]


def job_created(job: Job) -> JSONResponse:
    """202 ``{job_id}`` with the job's URL as ``Location``."""
    return JSONResponse(
        {"job_id": job.id},
        status_code=202,
        headers={"Location": f"{API_PREFIX}/jobs/{job.id}"},
    )


def router(ctx: ServerContext) -> APIRouter:
    """The routes that read and cancel jobs (the job kinds have their own modules)."""
    api = APIRouter()
    jobs = ctx.jobs

    @api.get(f"{API_PREFIX}/jobs", response_model=JobList, responses=ERROR_RESPONSES, tags=["jobs"])
    def list_jobs() -> dict[str, Any]:
        """All jobs of this server run, oldest first."""
        return {"jobs": [jobs.describe(j) for j in jobs.jobs()]}

    @api.get(
        f"{API_PREFIX}/jobs/{{job_id}}",
        response_model=JobInfo,
        responses=ERROR_RESPONSES,
        tags=["jobs"],
    )
    def get_job(job_id: str) -> dict[str, Any]:
        """State, progress and (when done) result of a job."""
        return jobs.describe(jobs.get(job_id))

    @api.delete(
        f"{API_PREFIX}/jobs/{{job_id}}",
        response_model=JobInfo,
        responses=ERROR_RESPONSES,
        tags=["jobs"],
    )
    def cancel_job(job_id: str) -> JSONResponse:
        """Cancel a job: a queued one at once (200), a running one at its next progress
        report (202; poll until its state is ``cancelled``)."""
        job = jobs.cancel(job_id)
        info = jobs.describe(job)
        return JSONResponse(info, status_code=200 if info["state"] == "cancelled" else 202)

    return api
