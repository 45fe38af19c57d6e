"""HTTP routes for batches and for explaining routes."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from farm.jobs import admit, batches
from farm.api import limits
from farm.api.routes import Project, over_limit, own_project, unroutable
from farm.db.tables import utcnow
from farm.errors import BadBatch, BatchNotFound, OverLimit, Unroutable
from farm.policy import get_policy
from farm.schemas import PROJECT_PATTERN, BatchAccepted, BatchCreate, BatchPublic
from farm.storage import Storage
from scheduler.routing import JobSpec, explain

router = APIRouter()


@router.post("/v1/batches", status_code=202, response_model=BatchAccepted)
def submit_batch(body: BatchCreate, request: Request, project: Project) -> BatchAccepted:
    own_project(body, project)
    admit = limits.for_app(request.app).admit
    try:  # every job of the batch counts, once its lines are known good
        batch, new = batches.create_batch(request.app.state.settings, body,
                                          lambda count: admit(project, count))
    except OverLimit as exc:
        raise over_limit(exc) from None
    except BadBatch as exc:
        where = f"content.line{exc.line}" if exc.line else "content"
        field = f"{where}.{exc.field}" if exc.field and exc.line else where
        item = {"field": field, "message": f"{field}: {exc}", "line": exc.line}
        if isinstance(exc.value, (int, float, str, bool, type(None))):
            item["value"] = exc.value
        raise HTTPException(422, [item]) from None
    except Unroutable as exc:
        raise unroutable(exc) from None
    return BatchAccepted(id=batch.id, jobs=len(new), state=batch.state,
                         url=str(request.url_for("get_batch", batch_id=batch.id)))


def _batch_or_404(db_url: str, batch_id: str, project: str):
    try:
        batch, states = batches.get_batch(db_url, batch_id)
    except BatchNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    if batch.project != project:
        raise HTTPException(403, f"batch {batch_id} belongs to another project")
    return batch, states


@router.get("/v1/batches/{batch_id}", response_model=BatchPublic, name="get_batch")
def get_batch(batch_id: str, request: Request, project: Project) -> BatchPublic:
    batch, states = _batch_or_404(request.app.state.settings.database_url, batch_id, project)
    urls = {kind: str(request.url_for("get_batch_report", batch_id=batch_id, kind=kind))
            for kind in batch.report_keys}
    return BatchPublic(
        id=batch.id, name=batch.name, project=batch.project, window=batch.window,
        timezone=batch.timezone, on_window_close=batch.on_window_close, state=batch.state,
        window_open=batches.open_window(batch, utcnow()), jobs=len(states),
        counts=batches.counts(states), job_ids=[job_id for job_id, _ in states],
        report_urls=urls, created_at=batch.created_at, finished_at=batch.finished_at,
    )


@router.get("/v1/batches/{batch_id}/report.{kind}", name="get_batch_report")
def get_batch_report(batch_id: str, kind: Literal["html", "csv"], request: Request,
                     project: Project):
    settings = request.app.state.settings
    batch, _ = _batch_or_404(settings.database_url, batch_id, project)
    if kind not in batch.report_keys:
        raise HTTPException(409, f"batch {batch_id} has no report yet: it is {batch.state}")
    with Storage(settings.storage_url).open(batch.report_keys[kind]) as fh:
        body = fh.read()
    media = "text/html; charset=utf-8" if kind == "html" else "text/csv; charset=utf-8"
    return Response(body, media_type=media)


class RouteQuery(BaseModel):
    """The fields of a job that the routing rules read."""

    model_config = ConfigDict(extra="forbid")

    track: Literal["draft", "final"] = "draft"
    width: Annotated[int, Field(ge=64, le=3840)] = 1280
    height: Annotated[int, Field(ge=64, le=3840)] = 720
    frames: Annotated[int, Field(ge=1, le=1281)] = 81
    fps: Annotated[int, Field(ge=1, le=60)] = 16
    priority: Annotated[int, Field(ge=0, le=100)] = 50
    batch: bool = False
    project: Annotated[str, Field(pattern=PROJECT_PATTERN)] = "default"
    model: str | None = None
    steps: Annotated[int | None, Field(ge=1, le=200)] = None
    deadline_s: Annotated[float | None, Field(gt=0)] = None


@router.get("/v1/routes/explain")
def explain_route(query: Annotated[RouteQuery, Query()], request: Request,
                  project: Project) -> dict:
    """Which rule a job with these fields would hit, which did not and why, and the memory
    arithmetic of the chosen route, against the queues as they are now."""
    policy = get_policy()
    if query.model is not None and query.model not in policy.catalog.models:
        raise HTTPException(422, [{"field": "model", "value": query.model,
                                   "message": f"model: unknown model {query.model!r}"}])
    loads = admit.queue_loads(request.app.state.settings.database_url)
    fields = query.model_dump()
    if "project" not in query.model_fields_set:  # by default, as the caller's own jobs
        fields["project"] = project
    result = explain(JobSpec(**fields), policy.rules, policy.catalog, loads)
    return result.__dict__
