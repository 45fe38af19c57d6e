"""OpenAI-style `/v1/videos` (issue #13, item 8), beside the farm's own `/v1/jobs`.

A client written for Wan's serving stacks, or the `openai` package's `client.videos`
(create, retrieve, list, download_content, delete), drives the farm unchanged: a video is a
job (same id, same key, same service). Wan2.2's knobs ride in the request (the client's
``extra_body``): negative_prompt, num_inference_steps, guidance_scale, guidance_scale_2, seed,
fps. Errors are the farm's: 422 with [{"field", "message"}] naming this API's field.
"""

from __future__ import annotations

import json
from typing import Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from farm.api import limits, picture_routes, routes
from farm.api.errors import validation_error_handler
from farm.api.routes import Project, _get_or_404
from farm.errors import OverLimit, PromptTooLong, Unroutable
from farm.jobs import admit, events, retention, service as jobs, submit
from farm.jobs.videos import FIELD_OF, VideoCreate, list_page, parse_form, to_video
from farm.db.tables import JobState


def openai_error(status: int, detail) -> dict:
    """OpenAI's error object (what its clients print): the farm's first problem."""
    first = detail[0] if isinstance(detail, list) and detail else {}
    message = first.get("message") if isinstance(first, dict) else None
    return {"message": message or str(detail), "type": "invalid_request_error"
            if status < 500 else "server_error", "param": first.get("field")
            if isinstance(first, dict) else None, "code": str(status)}


class OpenAIErrors(APIRoute):
    """Errors of these routes carry OpenAI's ``error`` object beside the farm's ``detail``
    (same status, same [{"field", "message"}]), so an OpenAI client shows the message."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def with_openai_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except HTTPException as exc:
                status, detail, headers = exc.status_code, exc.detail, exc.headers
            except RequestValidationError as exc:
                farm = await validation_error_handler(request, exc)
                status, detail, headers = 422, json.loads(farm.body)["detail"], None
            return JSONResponse({"detail": detail, "error": openai_error(status, detail)},
                                status_code=status, headers=headers)

        return with_openai_errors


router = APIRouter(route_class=OpenAIErrors)


def _invalid(exc: ValidationError, names: dict[str, str] | None = None) -> HTTPException:
    detail = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        field = ".".join((names or {}).get(p, p) for p in loc) or "body"
        message = err.get("msg", "invalid").removeprefix("Value error, ")
        if loc and loc[-1] in (names or {}) and loc[-1] not in message:
            message = f"{loc[-1]}: {message}"  # which part of it: "size: width: ..."
        item = {"field": field, "message": f"{field}: {message}"}
        if err.get("type") != "missing" and isinstance(err.get("input"), (str, int, float)):
            item["value"] = err["input"]
        detail.append(item)
    return HTTPException(422, detail)


async def _fields(request: Request) -> dict:
    """The create request's fields: multipart form (what the `openai` package sends) or
    JSON (what curl and most clients of the serving stacks send)."""
    content_type = request.headers.get("content-type", "")
    body = await request.body()
    if content_type.startswith("multipart/form-data"):
        return parse_form(body, content_type)
    try:
        fields = json.loads(body or b"{}")
    except ValueError as exc:
        raise HTTPException(422, [{"field": "body", "message": f"body: not JSON: {exc}"}]) \
            from None
    if not isinstance(fields, dict):
        raise HTTPException(422, [{"field": "body", "message": "body: must be a JSON object"}])
    return fields


def _video(request: Request, project: str, job_id: str):
    job = _get_or_404(request.app.state.settings.database_url, job_id, project)
    if job.state == JobState.deleted.value:
        raise HTTPException(404, f"video {job_id} was deleted")
    return job


@router.post("/v1/videos")
async def create_video(request: Request, project: Project) -> dict:
    try:
        wanted = VideoCreate.model_validate(await _fields(request))
        body = wanted.job_request(project)
    except ValidationError as exc:
        raise _invalid(exc, FIELD_OF) from None
    settings = request.app.state.settings
    try:
        limits.for_app(request.app).admit(project, 1)
        job = submit.submit(settings, body)
    except OverLimit as exc:
        raise routes.over_limit(exc) from None
    except Unroutable as exc:
        raise routes.unroutable(exc) from None
    except PromptTooLong as exc:
        raise HTTPException(422, [{"field": exc.field, "message": str(exc)}]) from None
    return to_video(jobs.get_job(settings.database_url, job.id))


@router.get("/v1/videos")
def list_videos(request: Request, project: Project, after: str | None = Query(None,
                max_length=64), limit: int = Query(20, ge=1, le=100),
                order: Literal["asc", "desc"] = "desc") -> dict:
    rows, more = list_page(request.app.state.settings.database_url, project, after, limit,
                           order)
    data = [to_video(job) for job in rows]
    return {"object": "list", "data": data, "has_more": more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


@router.get("/v1/videos/{job_id}")
def get_video(job_id: str, request: Request, project: Project) -> dict:
    return to_video(_video(request, project, job_id))


@router.get("/v1/videos/{job_id}/content")
def video_content(job_id: str, request: Request, project: Project,
                  variant: Literal["video", "thumbnail", "spritesheet"] = "video"):
    """The MP4 (checked against its sha256 as `/v1/jobs/{id}/video` is), its thumbnail, or
    its contact sheet as the spritesheet."""
    _video(request, project, job_id)
    if variant == "thumbnail":
        return picture_routes.thumbnail(job_id, request, project)
    if variant == "spritesheet":
        return picture_routes.contact_sheet(job_id, request, project)
    return routes.download_video(job_id, request, project)


@router.delete("/v1/videos/{job_id}")
def delete_video(job_id: str, request: Request, project: Project) -> dict:
    """A live video is canceled first (its GPUs freed); then, as `DELETE /v1/jobs/{id}`
    does, the retention service removes its files (what another job or the result cache
    names stays) and the job becomes ``deleted``, its record and log kept."""
    settings = request.app.state.settings
    job = _video(request, project, job_id)
    if job.state in jobs.LIVE_JOB_STATES and jobs.cancel_job(settings.database_url, job_id):
        events.record(settings.database_url, job_id, events.CANCELED,
                      "canceled by DELETE /v1/videos")
        admit.release_soon(settings)
    if not retention.delete_job_files(settings, job_id, "deleted by DELETE /v1/videos"):
        raise HTTPException(409, f"video {job_id} could not be deleted: it is "
                                 f"{jobs.job_state(settings.database_url, job_id)}")
    return {"id": job_id, "object": "video.deleted", "deleted": True}
