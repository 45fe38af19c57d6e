"""A background thread that calls ``beat`` every ``every_s`` seconds while a task runs.

The reconciler (farm.tasks.reconcile) reads the heartbeats: a task whose heartbeat is older than
the lease is taken as lost. A failing beat (the database restarting) is logged and the
thread goes on: a short outage must not look like a lost task once the database is back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, beat: Callable[[], object], every_s: float, what: str):
        self.beat, self.every_s, self.what = beat, every_s, what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {what}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.beat()
            except Exception as exc:
                log.warning("heartbeat of %s failed: %s: %s", self.what, type(exc).__name__, exc)
