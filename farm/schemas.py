"""API schemas: what a client may send (create) and what it gets back (public)."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**31 - 1
PROJECT_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
Project = Annotated[str, Field(pattern=PROJECT_PATTERN)]


WebhookEvent = Literal["start", "progress", "completed", "deadline_missed"]  # issue #15


def check_webhook_url(value: str | None) -> str | None:
    """An absolute http(s) URL with a host, or None."""
    from urllib.parse import urlsplit

    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"webhook must be an http(s) URL with a host, got {value!r}")
    return value


class JobCreate(BaseModel):
    """A render request. Every bound is checked here, before anything reaches a worker."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] = ""
    model: str | None = None  # None: the routing rules choose the variant
    track: Literal["draft", "final"] = "draft"  # quality track, for the routing rules
    project: Project = "default"
    deadline_s: Annotated[float | None, Field(gt=0, le=7 * 86400)] = None  # wanted within
    width: Annotated[int, Field(ge=64, le=3840)] = 1280  # output size, pixels
    height: Annotated[int, Field(ge=64, le=3840)] = 720
    frames: Annotated[int, Field(ge=1, le=1281)] = 17  # 4k+1
    fps: Annotated[int, Field(ge=1, le=60)] = 16
    steps: Annotated[int | None, Field(ge=1, le=200)] = None  # None: the model's default
    guidance: Annotated[float | None, Field(ge=0.0, le=20.0)] = None  # None: the model's own
    # The low-noise expert's scale (Wan2.2's guidance_scale_2, issue #13 item 8); None:
    # ``guidance`` if given, else the model's own.
    guidance_low: Annotated[float | None, Field(ge=0.0, le=20.0)] = None
    seed: Annotated[int | None, Field(ge=0, le=MAX_SEED)] = None  # None: drawn at submission
    priority: Annotated[int, Field(ge=0, le=100)] = 50
    # A long video's segments continue each other (no cuts; rendered one after another);
    # False: independent clips, rendered at once.
    continuous: bool = True
    # Issue #13. False: render even when the result cache holds this exact request.
    cache: bool = True
    hold: bool = False  # submitted held: admission passes it over until released
    timeout_s: Annotated[float | None, Field(gt=0, le=7 * 86400)] = None  # from admission
    queue_ttl_s: Annotated[float | None, Field(gt=0, le=30 * 86400)] = None  # never admitted: expired
    retain_days: Annotated[int | None, Field(ge=1, le=3650)] = None  # None: FARM_RETAIN_DAYS
    webhook: Annotated[str | None, Field(max_length=2048)] = None  # http(s) URL
    webhook_events: list[WebhookEvent] = ["completed"]

    @field_validator("webhook")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        return check_webhook_url(value)

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _printable(cls, value: str, info) -> str:
        bad = [c for c in value if unicodedata.category(c) == "Cc" and c not in "\n\t"]
        if bad:
            raise ValueError(f"{info.field_name} contains control character {bad[0]!r}")
        if info.field_name == "prompt" and not value.strip():
            raise ValueError("prompt is blank")
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str | None) -> str | None:
        from farm.policy import get_policy

        models = get_policy().catalog.models
        if value is not None and value not in models:
            raise ValueError(f"unknown model {value!r}; known models: {', '.join(sorted(models))}")
        return value

    @field_validator("frames")
    @classmethod
    def _four_k_plus_one(cls, value: int) -> int:
        if (value - 1) % 4:
            raise ValueError(f"frames must be 4k+1 (5, 9, 13, ... 81), got {value}")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_16(cls, value: int, info) -> int:
        if value % 16:
            raise ValueError(f"{info.field_name} must be a multiple of 16, got {value}")
        return value


class SegmentPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    index: int
    state: str
    frame_start: int
    render_frames: int
    progress: float
    attempts: int
    worker: str | None  # the Celery worker that ran it last
    error: str | None
    celery_id: str | None  # the render task's id: its progress state is in Flower
    # Issue #15: times it yielded its group to a more urgent job; the step it resumes from
    # (None: from noise); the batched render it ran in (None: alone).
    preemptions: int = 0
    resume_step: int | None = None
    render_batch: str | None = None


class JobPublic(BaseModel):
    id: str
    state: str
    progress: float
    prompt: str
    model: str
    width: int
    height: int
    frames: int
    fps: int
    steps: int
    seed: int
    priority: int
    project: str
    track: str
    continuous: bool = True  # segments continue each other (JobCreate.continuous)
    batch_id: str | None
    route: dict
    rules_sha256: str
    error: str | None
    output_url: str | None
    output_sha256: str | None
    created_at: datetime
    dispatched_at: datetime | None  # sent to its tier's queue by admission
    resends: int  # times the reconciler sent it again after its task was lost
    started_at: datetime | None
    finished_at: datetime | None
    queued_seconds: float | None
    run_seconds: float | None
    segments: list[SegmentPublic]
    # Issue #13.
    cached: bool = False  # answered from the result cache, no GPU used
    cached_from: str | None = None  # the job whose video answered it
    held: bool = False
    timeout_s: float | None = None
    queue_ttl_s: float | None = None
    retain_days: int | None = None
    deleted_at: datetime | None = None
    webhook: str | None = None
    webhook_events: list[str] = []
    queue_position: int | None = None  # 1: next to be admitted on its tier; None: not waiting
    eta_s: float | None = None  # seconds until it should finish, from the route's estimate
    stage_times: dict[str, float] = {}  # queue_wait, load, denoise, decode, encode, stitch
    peak_memory_bytes: int | None = None
    # Issue #15: created_at + deadline_s; the farm's estimate (measured step times, the work
    # ahead on its tier) says it will miss it; when it was seen missed (webhook sent).
    deadline_at: datetime | None = None
    deadline_risk: bool = False
    deadline_missed_at: datetime | None = None


class JobEventPublic(BaseModel):
    """One line of a job's log (farm.jobs.events)."""

    model_config = ConfigDict(from_attributes=True)

    created_at: datetime
    kind: str
    segment_index: int | None
    worker: str | None
    message: str


class JobAccepted(BaseModel):
    id: str
    state: str
    url: str


class JobList(BaseModel):
    items: list[JobPublic]
    total: int
    limit: int
    offset: int


class BatchCreate(BaseModel):
    """A batch: one job per line of a JSONL or CSV file (with seed fan-out), now or in a window."""

    model_config = ConfigDict(extra="forbid")

    content: Annotated[str, Field(min_length=1, max_length=8_000_000)]  # the file's text
    format: Literal["jsonl", "csv"] = "jsonl"
    name: Annotated[str, Field(max_length=128)] = ""
    project: Project = "default"
    timezone: Annotated[str, Field(max_length=64)] = "UTC"  # IANA name, for the window
    window: Annotated[str | None, Field(max_length=32)] = None  # e.g. "22:00-06:00"
    on_window_close: Literal["wait", "cancel"] = "wait"  # what is not started when it closes
    defaults: dict = {}  # job fields applied under every line
    webhook: Annotated[str | None, Field(max_length=2048)] = None  # the batch's events
    webhook_events: list[WebhookEvent] = ["completed"]

    @field_validator("webhook")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        return check_webhook_url(value)

    @field_validator("window")
    @classmethod
    def _window(cls, value: str | None, info) -> str | None:
        from scheduler.windows import Window

        if value is not None:
            Window.parse(value, info.data.get("timezone", "UTC"))
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from scheduler.windows import Window

        Window.parse("00:00-00:01", value)
        return value


class BatchAccepted(BaseModel):
    id: str
    jobs: int
    state: str
    url: str


class BatchPublic(BaseModel):
    id: str
    name: str
    project: str
    window: str | None
    timezone: str
    on_window_close: str
    state: str  # open | done
    window_open: bool | None  # None: no window
    jobs: int
    counts: dict[str, int]  # job state -> jobs
    job_ids: list[str]
    report_urls: dict[str, str]
    created_at: datetime
    finished_at: datetime | None
