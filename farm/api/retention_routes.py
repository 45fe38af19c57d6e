"""Deleting a job's files (issue #13, item 3): DELETE /v1/jobs/{id}."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request

from farm.api.routes import Project, _get_or_404, _settings, to_public
from farm.db.tables import FINAL_JOB_STATES
from farm.jobs import retention, service as jobs
from farm.schemas import JobPublic

router = APIRouter()


@router.delete("/v1/jobs/{job_id}", response_model=JobPublic)
def delete_job(job_id: str, request: Request, project: Project) -> JobPublic:
    """Remove an ended job's video, chunks and pictures (files another job or the result
    cache still names stay); the job becomes ``deleted``, its record and log are kept.
    Deleting a deleted job again is harmless. A live job is a 409: cancel it first."""
    settings = _settings(request)
    job = _get_or_404(settings.database_url, job_id, project)
    if job.state not in {s.value for s in FINAL_JOB_STATES} or \
            not retention.delete_job_files(settings, job_id, "deleted by request"):
        state = jobs.job_state(settings.database_url, job_id)
        raise HTTPException(409, f"job {job_id} is {state}: cancel it before deleting it")
    return to_public(jobs.get_job(settings.database_url, job_id), request)
