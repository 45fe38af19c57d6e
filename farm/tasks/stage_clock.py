"""One segment's stage times, read from its render's events (issue #13; the job's sums are
kept by farm.jobs.stage_times).

The actor stamps each progress event with ``began`` (the render started on it) and
``loaded`` (model, step cache and start state ready), and ``at`` (the step ended); each
frames event with ``decode_s`` (seconds decoding that chunk). Differences are taken on the
actor's own clock, never across machines. A split placement renders on two groups, each with
its own ``began``: each adds its own load and denoise.
"""

from __future__ import annotations

import time
from contextlib import contextmanager


class StageClock:
    def __init__(self):
        self.group_s = 0.0  # finding or making the actor group (it loads on creation)
        self.encode_s = 0.0  # encoding chunks and storing them, on this worker
        self.decode_s = 0.0
        self.peak_memory_bytes: int | None = None
        self._renders: dict[float, list[float]] = {}  # began -> [loaded, last step's at]

    @contextmanager
    def timing(self, stage: str):
        """Adds the block's seconds to ``group`` or ``encode``."""
        start = time.monotonic()
        try:
            yield
        finally:
            elapsed = time.monotonic() - start
            if stage == "group":
                self.group_s += elapsed
            else:
                self.encode_s += elapsed

    def track(self, event: dict) -> None:
        peak = event.get("peak_memory_bytes")
        if peak is not None:
            self.peak_memory_bytes = max(self.peak_memory_bytes or 0, int(peak))
        if event["kind"] == "progress" and "loaded" in event:
            render = self._renders.setdefault(event["began"], [event["loaded"], event["at"]])
            render[1] = event["at"]
        elif event["kind"] == "frames":
            self.decode_s += float(event.get("decode_s", 0.0))

    def seconds(self) -> dict[str, float]:
        """Stage -> seconds for this segment: load, denoise, decode, encode."""
        load = self.group_s + sum(loaded - began for began, (loaded, _) in self._renders.items())
        denoise = sum(last - loaded for loaded, last in self._renders.values())
        return {"load": load, "denoise": denoise, "decode": self.decode_s,
                "encode": self.encode_s}
