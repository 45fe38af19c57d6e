"""HTTP routes of the job controls (issue #13): retry, hold/release and priority, batch
cancel and retry-failed. The state changes are in farm.jobs.controls."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from farm.api.batch_routes import _batch_or_404
from farm.api.routes import Project, _get_or_404, with_estimate
from farm.errors import JobStateConflict
from farm.jobs import controls, service as jobs
from farm.schemas import JobPublic

router = APIRouter()


class JobPatch(BaseModel):
    """What may change while a job waits for admission."""

    model_config = ConfigDict(extra="forbid")

    priority: Annotated[int | None, Field(ge=0, le=100)] = None  # 0..100, 100 first
    hold: bool | None = None  # true: admission passes it over; false: released


class BatchAction(BaseModel):
    batch_id: str
    action: str  # cancel | retry-failed
    job_ids: list[str]  # the jobs it changed
    skipped: dict[str, str] = {}  # job id -> why not (retry-failed: still stopping)


def public_with_estimate(db_url: str, job_id: str, request: Request) -> JobPublic:
    return with_estimate(db_url, jobs.get_job(db_url, job_id), request)


def _conflict(exc: JobStateConflict) -> HTTPException:
    return HTTPException(409, str(exc))


@router.post("/v1/jobs/{job_id}/retry", response_model=JobPublic)
def retry_job(job_id: str, request: Request, project: Project) -> JobPublic:
    """A failed, canceled or expired job runs again, in its batch, keeping its log."""
    settings = request.app.state.settings
    _get_or_404(settings.database_url, job_id, project)
    try:
        controls.retry_job(settings, job_id)
    except JobStateConflict as exc:
        raise _conflict(exc) from None
    return public_with_estimate(settings.database_url, job_id, request)


@router.patch("/v1/jobs/{job_id}", response_model=JobPublic)
def patch_job(job_id: str, request: Request, project: Project,
              body: JobPatch | None = None) -> JobPublic:
    """Priority and hold, while the job waits for admission (409 once it was sent)."""
    settings = request.app.state.settings
    _get_or_404(settings.database_url, job_id, project)
    if body is None or (body.priority is None and body.hold is None):
        raise HTTPException(422, [{"field": "body", "value": None,
                                   "message": "body: give priority (0..100) or hold "
                                              "(true|false)"}])
    try:
        controls.change_queued(settings, job_id, held=body.hold, priority=body.priority)
    except JobStateConflict as exc:
        raise _conflict(exc) from None
    return public_with_estimate(settings.database_url, job_id, request)


@router.post("/v1/batches/{batch_id}/cancel", response_model=BatchAction)
def cancel_batch(batch_id: str, request: Request, project: Project) -> BatchAction:
    """Cancel every job of the batch that has not ended."""
    settings = request.app.state.settings
    _batch_or_404(settings.database_url, batch_id, project)
    return BatchAction(batch_id=batch_id, action="cancel",
                       job_ids=controls.cancel_batch(settings, batch_id))


@router.post("/v1/batches/{batch_id}/retry-failed", response_model=BatchAction)
def retry_failed(batch_id: str, request: Request, project: Project) -> BatchAction:
    """Retry the batch's failed and expired jobs (canceled ones stay canceled)."""
    settings = request.app.state.settings
    _batch_or_404(settings.database_url, batch_id, project)
    retried, skipped = controls.retry_failed(settings, batch_id)
    return BatchAction(batch_id=batch_id, action="retry-failed", job_ids=retried,
                       skipped=skipped)
