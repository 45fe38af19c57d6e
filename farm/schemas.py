"""API schemas: what a client may send (create) and what it gets back (public)."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from scheduler.catalog import MODELS

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**31 - 1


class JobCreate(BaseModel):
    """A render request. Every bound is checked here, before anything reaches a worker."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] = ""
    model: str = "wan-toy"
    width: Annotated[int, Field(ge=64, le=3840)] = 1280  # output size, pixels
    height: Annotated[int, Field(ge=64, le=3840)] = 720
    frames: Annotated[int, Field(ge=1, le=1281)] = 17  # 4k+1
    fps: Annotated[int, Field(ge=1, le=60)] = 16
    steps: Annotated[int | None, Field(ge=1, le=200)] = None  # None: the model's default
    guidance: Annotated[float | None, Field(ge=0.0, le=20.0)] = None  # None: the model's own
    seed: Annotated[int | None, Field(ge=0, le=MAX_SEED)] = None  # None: drawn at submission
    priority: Annotated[int, Field(ge=0, le=100)] = 50

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
    def _known_model(cls, value: str) -> str:
        if value not in MODELS:
            raise ValueError(f"unknown model {value!r}; known models: {', '.join(sorted(MODELS))}")
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
    error: str | None
    celery_id: str | None  # the render task's id: its progress state is in Flower


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
    route: dict
    error: str | None
    output_url: str | None
    output_sha256: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queued_seconds: float | None
    run_seconds: float | None
    segments: list[SegmentPublic]


class JobAccepted(BaseModel):
    id: str
    state: str
    url: str


class JobList(BaseModel):
    items: list[JobPublic]
    total: int
    limit: int
    offset: int
