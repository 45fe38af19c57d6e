"""The farm's exceptions. Each class says whether a task that raised it is retried."""

from __future__ import annotations


class FarmError(Exception):
    """Base class. ``retryable``: whether a Celery task that raised it tries again."""

    retryable = False


class JobNotFound(FarmError):
    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"no job with id {job_id!r}")


class SegmentExhausted(FarmError):
    """A segment was started as often as allowed and never finished. Never retried."""


class ModelUnavailable(FarmError):
    """The model folder is missing or malformed. Never retried: a person must fix it."""


class WorkerLost(FarmError):
    """A Ray actor died or could not be reached. Retried on a fresh actor."""

    retryable = True


class OutputInvalid(FarmError):
    """ffprobe found the stitched video wrong (size, frames, codec). Never retried."""
