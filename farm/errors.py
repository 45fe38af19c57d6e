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


class QueueUnavailable(FarmError):
    """The broker refused a send. The job stays queued in the database; the next release
    (a later submission, a job leaving the GPUs, a beat tick) sends it."""

    retryable = True


class Unroutable(FarmError):
    """No routing rule matches the job; the message says why each rule did not."""


class BadBatch(FarmError):
    """A batch file line that cannot become a job; names the line, field and value."""

    def __init__(self, message: str, line: int | None = None, field: str | None = None,
                 value=None):
        super().__init__(message)
        self.line, self.field, self.value = line, field, value


class BatchNotFound(FarmError):
    def __init__(self, batch_id: str):
        super().__init__(f"no batch with id {batch_id!r}")


class IdempotencyConflict(FarmError):
    """The Idempotency-Key was used before with a different request body."""


class PromptTooLong(FarmError):
    """A prompt with more tokens than the model's text encoder reads."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class SegmentFailed(FarmError):
    """A segment failed for good (farm.tasks.failure_policy): on enough different workers, or with no
    worker left that is not blocklisted for its job. The message carries every failure."""


class OverLimit(FarmError):
    """A submission over its project's rate limit or queued cap (farm/api/limits.py): HTTP
    429, the message naming both with their numbers, ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class JobStateConflict(FarmError):
    """A job control (retry, hold, priority; issue #13) asked of a job in a state that does
    not allow it: HTTP 409, the message naming the job's state."""

    def __init__(self, job_id: str, state: str, message: str):
        super().__init__(message)
        self.job_id, self.state = job_id, state
