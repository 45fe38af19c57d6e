"""The split placement: the high-noise expert on one actor group, the low-noise expert on
another, the render's state handed from one to the other through Ray's object store
(workers/parallel/placement.py says what each placement is)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from workers.group import ActorGroup


class SplitGroup:
    """The split placement: the high-noise expert's group, then the low-noise expert's. The
    render's state goes from one to the other through the object store, so while one job's
    low-noise phase runs, the next job's high-noise phase can."""

    def __init__(self, high: ActorGroup, low: ActorGroup):
        self.high, self.low = high, low
        self.actors = high.actors + low.actors

    def render(self, request: dict, latent_frames_per_chunk: int = 4,
               request_id: str | None = None) -> "SplitStream":
        return SplitStream(self, request, latent_frames_per_chunk, request_id or uuid.uuid4().hex)

    def latents(self, request: dict, request_id: str | None = None):
        request_id = request_id or uuid.uuid4().hex
        return self.low.latents(request, request_id, self.high.latents(request, request_id))

    def cancel(self, request_id: str) -> None:
        self.high.cancel(request_id)
        self.low.cancel(request_id)

    def info(self) -> list[dict]:
        return self.high.info() + self.low.info()

    def kill(self) -> None:
        self.high.kill()
        self.low.kill()


class SplitStream:
    """The high-noise group's progress events, then the low-noise group's events and frames."""

    def __init__(self, group: SplitGroup, request: dict, chunk: int, request_id: str):
        self.group, self.request, self.chunk, self.request_id = group, request, chunk, request_id

    def cancel(self) -> None:
        self.group.cancel(self.request_id)

    def __iter__(self) -> Iterator[dict]:
        state = None
        try:
            for event in self.group.high.render(self.request, self.chunk, self.request_id):
                if event["kind"] == "handover":
                    state = event["state"]
                else:
                    yield event
            yield from self.group.low.render(self.request, self.chunk, self.request_id, state)
        finally:
            if state is not None:  # the low-noise group took it (or never will)
                self.release()

    def release(self) -> None:
        """The high-noise rank 0 keeps each handed-over state alive until this call
        (workers/actor.py `release_handover`); a dead actor has nothing left to release."""
        self.group.high.actors[0].release_handover.remote(self.request_id)
