"""Limits on what one client may send: request bodies over FARM_MAX_BODY_BYTES are refused
with a 413 before they are read whole, and submissions are counted per project (issue #11.9).

Every job counts, each line of a batch included, against two limits: the rate
(FARM_RATE_LIMIT_PER_MINUTE jobs in any 60 s) and the queued cap
(FARM_MAX_QUEUED_PER_PROJECT jobs waiting or queued at once). A submission over either is
refused whole, with an OverLimit (HTTP 429) naming both limits and their numbers.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections import defaultdict, deque

from farm.errors import OverLimit
from farm.jobs import service as jobs
from farm.settings import Settings, is_redis_url

WINDOW_S = 60.0
CAP_RETRY_S = 30  # Retry-After when the queued cap refused: jobs leave the queue in minutes

# One atomic step in Redis (a script runs alone): drop stamps older than the window, count,
# and add one stamp per job only if all fit. The server's clock: every API process agrees.
# KEYS[1]: the project's sorted set; ARGV: window (s), limit, jobs, a unique member prefix.
# Returns {admitted 0|1, stamps in the window before, seconds until enough expire}.
_RATE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window, limit, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = redis.call('ZCARD', KEYS[1])
if used + n > limit then
  local wait = window
  if n <= limit then
    local oldest = redis.call('ZRANGE', KEYS[1], used + n - limit - 1, used + n - limit - 1,
                              'WITHSCORES')
    if oldest[2] then wait = tonumber(oldest[2]) + window - now end
  end
  return {0, used, tostring(wait)}
end
for i = 1, n do redis.call('ZADD', KEYS[1], now, ARGV[4] .. ':' .. i) end
redis.call('EXPIRE', KEYS[1], math.ceil(window) + 1)
return {1, used, '0'}
"""


class SubmissionLimits:
    """The rate in Redis when the broker is Redis (every API process shares it), else in
    this process (the embedded farm); the queued cap from the database."""

    def __init__(self, settings: Settings):
        self.per_minute, self.cap = settings.rate_limit_per_minute, settings.max_queued_per_project
        self.db_url = settings.database_url
        self._script = None
        if is_redis_url(settings.broker_url):
            import redis

            self._script = redis.Redis.from_url(settings.broker_url).register_script(_RATE_SCRIPT)
        self._local: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def admit(self, project: str, count: int = 1) -> None:
        """Count ``count`` jobs of ``project``, or raise OverLimit and count none. The cap
        is checked first, so a refused submission uses none of the rate. Two submissions at
        the same moment may pass the cap together (it is read, not locked): it can be over
        by the submissions in flight, never by more."""
        queued = jobs.count_queued(self.db_url, project) if self.cap > 0 else 0
        if self.cap > 0 and queued + count > self.cap:
            raise OverLimit(self._message(project, count, "the queued cap", queued=queued),
                            CAP_RETRY_S)
        if self.per_minute <= 0:
            return
        ok, used, wait = (self._redis_take(project, count) if self._script is not None
                          else self._local_take(project, count))
        if not ok:
            raise OverLimit(self._message(project, count, "the rate limit", used=used,
                                          queued=queued), max(1, math.ceil(wait)))

    def _message(self, project: str, count: int, over: str, used: int | None = None,
                 queued: int | None = None) -> str:
        rate = (f"rate limit {self.per_minute} jobs per {WINDOW_S:.0f} s"
                if self.per_minute > 0 else "no rate limit")
        if used is not None:
            rate += f" ({used} used)"
        cap = f"queued cap {self.cap} jobs" if self.cap > 0 else "no queued cap"
        if queued is not None and self.cap > 0:
            cap += f" ({queued} waiting or queued)"
        text = f"project {project!r}: {count} job(s) refused, over {over}: {rate}; {cap}"
        if 0 < self.per_minute < count:
            text += f"; a batch of more than {self.per_minute} jobs never fits: split it"
        return text

    def _redis_take(self, project: str, count: int) -> tuple[bool, int, float]:
        ok, used, wait = self._script(keys=[f"farm:rate:{project}"],
                                      args=[WINDOW_S, self.per_minute, count, uuid.uuid4().hex])
        return bool(ok), int(used), float(wait)

    def _local_take(self, project: str, count: int) -> tuple[bool, int, float]:
        now = time.time()
        with self._lock:
            stamps = self._local[project]
            while stamps and stamps[0] <= now - WINDOW_S:
                stamps.popleft()
            used = len(stamps)
            if used + count > self.per_minute:
                wait = (stamps[used + count - self.per_minute - 1] + WINDOW_S - now
                        if count <= self.per_minute else WINDOW_S)
                return False, used, wait
            stamps.extend([now] * count)
            return True, used, 0.0


_made = threading.Lock()


def for_app(app) -> SubmissionLimits:
    """The app's SubmissionLimits (``app.state.submission_limits``), made on first use."""
    with _made:
        limits = getattr(app.state, "submission_limits", None)
        if limits is None:
            limits = app.state.submission_limits = SubmissionLimits(app.state.settings)
        return limits


class BodyLimit:
    """ASGI middleware: checks Content-Length, and counts the bytes of bodies sent without it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send, int(length))
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(seen)
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge as exc:
            await self._refuse(send, exc.size)

    async def _refuse(self, send, size: int) -> None:
        body = json.dumps({"detail": [{"field": "body", "value": size,
                                       "message": f"body: {size} bytes; at most "
                                                  f"{self.max_bytes}"}]}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    def __init__(self, size: int):
        self.size = size
