"""Who is calling: every route but /healthz needs a project's API key (HTTP errors here only).

`Authorization: Bearer <key>` or `X-API-Key: <key>`. No key or a bad or revoked one: 401.
A job or batch of another project: 403 (farm.api.routes). Submissions are rate limited per
project (429 with Retry-After).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

from fastapi import HTTPException, Request

from farm.jobs import keys
from farm.settings import is_redis_url

WINDOW_S = 60.0


def current_project(request: Request) -> str:
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else \
        request.headers.get("x-api-key", "")
    if not key:
        raise HTTPException(401, "an API key is required (Authorization: Bearer <key>)",
                            headers={"WWW-Authenticate": "Bearer"})
    project = keys.project_of(request.app.state.settings.database_url, key)
    if project is None:
        raise HTTPException(401, "the API key is not valid (unknown or revoked)",
                            headers={"WWW-Authenticate": "Bearer"})
    return project


class RateLimiter:
    """Submissions per project per minute, a sliding window: in Redis when the broker is
    Redis (every API process shares it), else in this process (the embedded farm)."""

    def __init__(self, per_minute: int, redis_url: str | None):
        self.per_minute = per_minute
        self._redis = None
        if is_redis_url(redis_url):
            import redis

            self._redis = redis.Redis.from_url(redis_url)
        self._local: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def check(self, project: str) -> None:
        """Count one submission; HTTP 429 with Retry-After when over the limit."""
        if self.per_minute <= 0:
            return
        now = time.time()
        wait = self._redis_wait(project, now) if self._redis is not None else \
            self._local_wait(project, now)
        if wait is not None:
            raise HTTPException(429, f"project {project!r} submitted more than "
                                f"{self.per_minute} times in {WINDOW_S:.0f} s",
                                headers={"Retry-After": str(max(1, int(wait + 0.999)))})

    def _local_wait(self, project: str, now: float) -> float | None:
        with self._lock:
            stamps = self._local[project]
            while stamps and stamps[0] <= now - WINDOW_S:
                stamps.popleft()
            if len(stamps) >= self.per_minute:
                return stamps[0] + WINDOW_S - now
            stamps.append(now)
            return None

    def _redis_wait(self, project: str, now: float) -> float | None:
        key = f"farm:rate:{project}"
        pipe = self._redis.pipeline()
        pipe.zremrangebyscore(key, 0, now - WINDOW_S)
        pipe.zcard(key)
        pipe.zrange(key, 0, 0, withscores=True)
        _, count, oldest = pipe.execute()
        if count >= self.per_minute:
            return (oldest[0][1] + WINDOW_S - now) if oldest else WINDOW_S
        pipe.zadd(key, {f"{now}:{time.perf_counter_ns()}": now})
        pipe.expire(key, int(WINDOW_S) + 1)
        pipe.execute()
        return None
