"""The split placement: the high-noise expert on one actor group, the low-noise expert on
another, the render's state handed from one to the other through Ray's object store
(workers/parallel/placement.py says what each placement is)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from workers import resume_state
from workers.group import ActorGroup


class SplitGroup:
    """The split placement: the high-noise expert's group, then the low-noise expert's. The
    render's state goes from one to the other through the object store, so while one job's
    low-noise phase runs, the next job's high-noise phase can."""

    def __init__(self, high: ActorGroup, low: ActorGroup):
        self.high, self.low = high, low
        self.actors = high.actors + low.actors

    def render(self, request: dict, latent_frames_per_chunk: int = 4,
               request_id: str | None = None, state: bytes | None = None) -> "SplitStream":
        """``state``: a preempted render's saved state (workers/resume_state.py) to resume."""
        return SplitStream(self, request, latent_frames_per_chunk, request_id or uuid.uuid4().hex,
                           state)

    def latents(self, request: dict, request_id: str | None = None):
        request_id = request_id or uuid.uuid4().hex
        return self.low.latents(request, request_id, self.high.latents(request, request_id))

    def cancel(self, request_id: str) -> None:
        self.high.cancel(request_id)
        self.low.cancel(request_id)

    def preempt(self, request_id: str) -> None:
        """Both groups are asked: whichever is rendering the request yields (issue #15)."""
        self.high.preempt(request_id)
        self.low.preempt(request_id)

    def info(self) -> list[dict]:
        return self.high.info() + self.low.info()

    def kill(self) -> None:
        self.high.kill()
        self.low.kill()


class SplitStream:
    """The high-noise group's progress events, then the low-noise group's events and frames.

    Preemption (issue #15): a preempt during the high phase ends the stream with the high
    group's "preempted" event (the low group never starts); during the low phase, with the
    low group's. A resumed render starts on the group whose expert runs the saved state's
    next step: past the boundary, the high group is skipped."""

    def __init__(self, group: SplitGroup, request: dict, chunk: int, request_id: str,
                 state: bytes | None = None):
        self.group, self.request, self.chunk, self.request_id = group, request, chunk, request_id
        self.state = state

    def cancel(self) -> None:
        self.group.cancel(self.request_id)

    def preempt(self) -> None:
        self.group.preempt(self.request_id)

    def _resumes_on_low(self) -> bool:
        return (self.state is not None
                and resume_state.describe(self.state)["info"].get("next_expert") == "low")

    def __iter__(self) -> Iterator[dict]:
        handover, low_state = None, self.state
        try:
            if not self._resumes_on_low():
                for event in self.group.high.render(self.request, self.chunk, self.request_id,
                                                    self.state):
                    if event["kind"] == "handover":
                        handover = low_state = event["state"]
                        continue
                    yield event
                    if event["kind"] == "preempted":
                        return  # the low-noise group never starts
            yield from self.group.low.render(self.request, self.chunk, self.request_id,
                                             low_state)
        finally:
            if handover is not None:  # the low-noise group took it (or never will)
                self.release()

    def release(self) -> None:
        """The high-noise rank 0 keeps each handed-over state alive until this call
        (workers/actor.py `release_handover`); a dead actor has nothing left to release."""
        self.group.high.actors[0].release_handover.remote(self.request_id)
