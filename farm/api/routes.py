"""HTTP routes. HTTP errors are raised here only; the services below raise FarmErrors."""

from __future__ import annotations

import logging

from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from fastapi.responses import (
    FileResponse, JSONResponse, RedirectResponse, StreamingResponse,
)
from sqlalchemy import text

from farm.jobs import admit, events, integrity, service as jobs, stage_times, submit
from farm.jobs.controls import queue_estimate
from farm.db.tables import Job, JobState
from farm.db.session import get_engine
from farm.api import limits
from farm.api.auth import current_project
from farm.errors import IdempotencyConflict, JobNotFound, OverLimit, PromptTooLong, Unroutable
from farm.schemas import (
    JobAccepted, JobCreate, JobEventPublic, JobList, JobPublic, SegmentPublic,
)
from farm.storage import Storage

log = logging.getLogger(__name__)
router = APIRouter()
Project = Annotated[str, Depends(current_project)]


def _settings(request: Request):
    return request.app.state.settings


def to_public(job: Job, request: Request) -> JobPublic:
    queued = run = None
    if job.started_at:
        queued = (job.started_at - job.created_at).total_seconds()
        if job.finished_at:
            run = (job.finished_at - job.started_at).total_seconds()
    url = None
    if job.state == JobState.succeeded.value:
        url = str(request.url_for("download_video", job_id=job.id))
    return JobPublic(
        id=job.id, state=job.state, progress=round(job.progress, 4), prompt=job.prompt,
        model=job.model, width=job.width, height=job.height, frames=job.frames, fps=job.fps,
        steps=job.steps, seed=job.seed, priority=job.priority, project=job.project,
        track=job.track, batch_id=job.batch_id, route=job.route, rules_sha256=job.rules_sha256,
        error=job.error,
        output_url=url, output_sha256=job.output_sha256, created_at=job.created_at,
        dispatched_at=job.dispatched_at, resends=job.resends, continuous=job.continuous,
        started_at=job.started_at, finished_at=job.finished_at, queued_seconds=queued,
        run_seconds=run, segments=[SegmentPublic.model_validate(s) for s in job.segments],
        cached=job.cached_from is not None, cached_from=job.cached_from, held=job.held,
        timeout_s=job.timeout_s, queue_ttl_s=job.queue_ttl_s, retain_days=job.retain_days,
        deleted_at=job.deleted_at, webhook=job.webhook, webhook_events=job.webhook_events or [],
        stage_times=job.stage_times or {}, peak_memory_bytes=job.peak_memory_bytes,
        deadline_at=job.deadline_at, deadline_risk=bool(job.deadline_risk),
        deadline_missed_at=job.deadline_missed_at,
    )


def _get_or_404(db_url: str, job_id: str, project: str) -> Job:
    """The job, if the caller's project owns it: 404 if there is none, 403 if not theirs."""
    try:
        job = jobs.get_job(db_url, job_id)
    except JobNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    if job.project != project:
        raise HTTPException(403, f"job {job_id} belongs to another project")
    return job


def own_project(body, project: str) -> None:
    """A submission belongs to the key's project (set on ``body``). Naming another is a 403."""
    if "project" in body.model_fields_set and body.project != project:
        raise HTTPException(403, f"body.project: got {body.project!r}; this API key "
                                 f"belongs to project {project!r}")
    body.project = project


def over_limit(exc: OverLimit) -> HTTPException:
    return HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after)})


def unroutable(exc: Unroutable) -> HTTPException:
    return HTTPException(422, [{"field": "route", "message": f"route: {exc}"}])


@router.post("/v1/jobs", status_code=202, response_model=JobAccepted)
def submit_job(body: JobCreate, request: Request, project: Project,
               idempotency_key: Annotated[str | None, Header(max_length=128)] = None
               ) -> JobAccepted:
    own_project(body, project)
    try:
        limits.for_app(request.app).admit(project, 1)
        job = submit.submit(_settings(request), body, idempotency_key)
    except OverLimit as exc:
        raise over_limit(exc) from None
    except Unroutable as exc:
        raise unroutable(exc) from None
    except IdempotencyConflict as exc:
        raise HTTPException(409, str(exc)) from None
    except PromptTooLong as exc:
        raise HTTPException(422, [{"field": exc.field, "message": str(exc)}]) from None
    return JobAccepted(id=job.id, state=job.state,
                       url=str(request.url_for("get_job", job_id=job.id)))


@router.get("/v1/jobs", response_model=JobList)
def list_jobs(request: Request, project: Project, state: JobState | None = None,
              limit: int = Query(20, ge=1, le=200), offset: int = Query(0, ge=0)) -> JobList:
    rows, total = jobs.list_jobs(_settings(request).database_url,
                                 state.value if state else None, limit, offset, project)
    return JobList(items=[to_public(j, request) for j in rows], total=total, limit=limit,
                   offset=offset)


@router.get("/v1/jobs/{job_id}", response_model=JobPublic, name="get_job")
def get_job(job_id: str, request: Request, response: Response, project: Project) -> JobPublic:
    db = _settings(request).database_url
    job = _get_or_404(db, job_id, project)
    if job.stage_times:  # where its time went, in ms (issue #13)
        response.headers["Server-Timing"] = stage_times.server_timing(job.stage_times)
    return with_estimate(db, job, request)


def with_estimate(db_url: str, job: Job, request: Request) -> JobPublic:
    """The job as GET /v1/jobs/{id} shows it: with queue_position and eta_s (the list
    leaves these two None: a query each)."""
    public = to_public(job, request)
    public.queue_position, public.eta_s = queue_estimate(db_url, job)
    return public


@router.get("/v1/jobs/{job_id}/events", response_model=list[JobEventPublic])
def job_events(job_id: str, request: Request, project: Project) -> list[JobEventPublic]:
    """The job's log: segments started, failed, lost and re-sent, workers blocklisted."""
    db = _settings(request).database_url
    _get_or_404(db, job_id, project)
    return [JobEventPublic.model_validate(e) for e in events.list_events(db, job_id)]


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, request: Request, project: Project) -> JobPublic:
    db = _settings(request).database_url
    _get_or_404(db, job_id, project)
    if not jobs.cancel_job(db, job_id):
        job = jobs.get_job(db, job_id)
        raise HTTPException(409, f"job {job_id} has already ended: {job.state}")
    events.record(db, job_id, events.CANCELED, "canceled by request")  # issue #13
    admit.release_soon(_settings(request))  # the GPUs it held, if any, are free
    return to_public(jobs.get_job(db, job_id), request)


@router.get("/v1/jobs/{job_id}/video", name="download_video")
def download_video(job_id: str, request: Request, project: Project, redirect: bool = True):
    """The video: served from a local folder; on S3 a 307 to a presigned URL, or with
    ``?redirect=false`` JSON {url, sha256, expires_at}. Not re-hashed here: its sha256 was
    taken when stored and is re-checked on a schedule (farm/jobs/integrity.py)."""
    settings = _settings(request)
    job = _get_or_404(settings.database_url, job_id, project)
    if job.state != JobState.succeeded.value or not job.output_key:
        raise HTTPException(409, f"job {job_id} has no video: it is {job.state}")
    if integrity.is_corrupt(job):
        raise HTTPException(500, f"job {job_id}: {job.error}")
    storage = Storage(settings.storage_url)
    headers = {"ETag": f'"{job.output_sha256}"', "X-Content-SHA256": job.output_sha256 or ""}
    if storage.is_s3:
        url, expires = storage.signed_url(job.output_key, settings.presign_expiry_s)
        if not redirect:
            return JSONResponse({"url": url, "sha256": job.output_sha256,
                                 "expires_at": expires.isoformat()}, headers=headers)
        return RedirectResponse(url, status_code=307, headers=headers)
    local = storage.local_path(job.output_key)
    if local is not None:
        return FileResponse(local, media_type="video/mp4", filename=f"{job_id}.mp4",
                            headers=headers)

    def chunks():
        with storage.open(job.output_key) as fh:
            while block := fh.read(1 << 20):
                yield block

    return StreamingResponse(chunks(), media_type="video/mp4", headers=headers)


@router.get("/healthz")
def healthz(request: Request):
    settings = _settings(request)
    status = {"database": "ok", "broker": "ok"}
    try:
        with get_engine(settings.database_url).connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # reported, not raised: this route says what is down
        status["database"] = f"error: {type(exc).__name__}"
    try:
        request.app.state.check_broker()
    except Exception as exc:
        status["broker"] = f"error: {type(exc).__name__}"
    healthy = all(v == "ok" for v in status.values())
    if not healthy:
        log.warning("health check failed: %s", status)
        raise HTTPException(503, status)
    return status
