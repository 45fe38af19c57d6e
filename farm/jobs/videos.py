"""OpenAI-style videos (issue #13, item 8): the request and the Video object of the
`/v1/videos` API that Wan's serving stacks answer (vLLM-Omni, SGLang Diffusion, trtllm-serve,
FastVideo, Dynamo) and the `openai` package's `client.videos` speaks, mapped onto the farm's
jobs. A video is a job: the same id, the same service.
"""

from __future__ import annotations

import email.parser
import email.policy
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import or_, select
from sqlalchemy.orm import selectinload

from farm.db.session import session_scope
from farm.db.tables import Job, JobState
from farm.jobs.retention import FOREVER
from farm.schemas import MAX_PROMPT_CHARS, MAX_SEED, JobCreate

# OpenAI status of each job state; a deleted job is gone (404), as a deleted video is.
STATUS = {"queued": "queued", "waiting": "queued", "running": "in_progress",
          "stitching": "in_progress", "succeeded": "completed", "failed": "failed",
          "canceled": "failed", "expired": "failed"}
# JobCreate's fields under the names this API gives them, for errors that name the field.
FIELD_OF = {"width": "size", "height": "size", "frames": "seconds", "steps":
            "num_inference_steps", "guidance": "guidance_scale",
            "guidance_low": "guidance_scale_2"}


class VideoCreate(BaseModel):
    """`POST /v1/videos`: OpenAI's fields (prompt, model, seconds, size, input_reference)
    and, from the client's ``extra_body``, Wan2.2's own knobs as diffusers names them."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    model: str | None = None  # a farm model (wan-tiny, wan2.2-a14b, ...); None: the rules'
    seconds: Annotated[float, Field(gt=0, le=80)] = 4.0  # OpenAI sends "4", "8", "12"
    size: Annotated[str, Field(max_length=16)] = "1280x720"  # "WxH", pixels
    input_reference: object = None  # image-to-video: not rendered by this farm
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] = ""
    fps: Annotated[int, Field(ge=1, le=60)] = 16
    num_inference_steps: Annotated[int | None, Field(ge=1, le=200)] = None
    guidance_scale: Annotated[float | None, Field(ge=0.0, le=20.0)] = None  # high-noise expert
    guidance_scale_2: Annotated[float | None, Field(ge=0.0, le=20.0)] = None  # low-noise
    seed: Annotated[int | None, Field(ge=0, le=MAX_SEED)] = None
    priority: Annotated[int, Field(ge=0, le=100)] = 50
    track: Annotated[str, Field(pattern=r"^(draft|final)$")] = "draft"

    @field_validator("input_reference")
    @classmethod
    def _text_to_video_only(cls, value: object) -> None:
        if value is not None:
            raise ValueError("image-to-video is not supported: this farm renders text to "
                             "video; leave input_reference out")
        return None

    @field_validator("size")
    @classmethod
    def _size(cls, value: str) -> str:
        width, sep, height = value.lower().partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            raise ValueError(f"size must be WIDTHxHEIGHT in pixels (e.g. 1280x720), got {value!r}")
        return f"{int(width)}x{int(height)}"

    def dimensions(self) -> tuple[int, int]:
        width, height = self.size.split("x")
        return int(width), int(height)

    def frames(self) -> int:
        """``seconds`` at ``fps`` as Wan's 4k+1 frames (at least 5)."""
        return 4 * max(1, round(self.seconds * self.fps / 4)) + 1

    def job_request(self, project: str) -> JobCreate:
        """The farm's request; a pydantic ValidationError names JobCreate's fields
        (FIELD_OF gives this API's)."""
        width, height = self.dimensions()
        return JobCreate(prompt=self.prompt, negative_prompt=self.negative_prompt,
                         model=self.model, width=width, height=height, frames=self.frames(),
                         fps=self.fps, steps=self.num_inference_steps,
                         guidance=self.guidance_scale, guidance_low=self.guidance_scale_2,
                         seed=self.seed, priority=self.priority, track=self.track,
                         project=project)


def parse_form(body: bytes, content_type: str) -> dict[str, str]:
    """A multipart/form-data body's text fields (the `openai` package sends create's fields
    so). A file part (an ``input_reference`` upload) comes back as its field name, which
    VideoCreate then refuses."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name is None:
            continue
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            if part.get_filename() or payload:  # not an empty file input, as forms send
                fields[str(name)] = f"<file {part.get_filename()}>"
            continue
        fields[str(name)] = payload.decode(part.get_content_charset() or "utf-8")
    return fields


def expires_at(job: Job) -> int | None:
    """When retention deletes the job's files (unix seconds); None until retention has
    stamped the ended job (minutes after it ends), or when it is kept forever."""
    if job.expires_at is None or job.expires_at >= FOREVER:
        return None
    return int(job.expires_at.timestamp())


def to_video(job: Job) -> dict:
    """The OpenAI Video object of a job (times: unix seconds)."""
    status = STATUS.get(job.state, "failed")
    error = None
    if status == "failed":
        error = {"code": job.state, "message": job.error or f"the job was {job.state}"}
    return {
        "id": job.id, "object": "video", "status": status, "model": job.model,
        "progress": 100 if status == "completed" else int(job.progress * 100),
        "created_at": int(job.created_at.timestamp()),
        "completed_at": int(job.finished_at.timestamp()) if job.finished_at else None,
        "expires_at": expires_at(job), "prompt": job.prompt, "seconds": f"{job.frames / job.fps:g}",
        "size": f"{job.width}x{job.height}", "error": error, "remixed_from_video_id": None,
    }


def list_page(db_url: str, project: str, after: str | None, limit: int,
              order: str) -> tuple[list[Job], bool]:
    """A page of the project's videos by creation time (``order`` asc | desc), after the
    video ``after`` (a cursor: (created_at, id), looked up in the project only: another
    project's id is no cursor, as an unknown one is not); deleted ones are left out.
    (jobs, more)."""
    with session_scope(db_url) as session:
        query = (select(Job).options(selectinload(Job.segments))
                 .where(Job.project == project, Job.state != JobState.deleted.value))
        if after is not None:
            mark = session.scalar(select(Job).where(Job.id == after, Job.project == project))
            if mark is not None:
                newer = Job.created_at > mark.created_at if order == "asc" else \
                    Job.created_at < mark.created_at
                tie = Job.id > mark.id if order == "asc" else Job.id < mark.id
                query = query.where(or_(newer, (Job.created_at == mark.created_at) & tie))
        sort = (Job.created_at.asc(), Job.id.asc()) if order == "asc" else \
            (Job.created_at.desc(), Job.id.desc())
        rows = list(session.scalars(query.order_by(*sort).limit(limit + 1)).all())
    return rows[:limit], len(rows) > limit
