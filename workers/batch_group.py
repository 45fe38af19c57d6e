"""Batched renders on one actor group (issue #15, item 2)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from workers.batch_render import check_batch


class BatchGroupMixin:
    """ActorGroup's batched render (workers/group.py inherits it)."""

    def render_batch(self, requests: list[dict], latent_frames_per_chunk: int = 4,
                     request_ids: list[str] | None = None) -> "BatchStream":
        """Like `render`, for several like requests at once on this group's one rank
        (workers/batch_render.py says what a batch keeps per member). Checked here too, so a
        bad batch fails in the caller before any actor is asked."""
        request_ids = request_ids or [uuid.uuid4().hex for _ in requests]
        check_batch(requests, request_ids)
        if len(self.actors) != 1:
            raise ValueError(f"batched renders run on single-rank groups; {self.name} has "
                             f"{len(self.actors)} ranks")
        # Backpressure as for a solo render: a cancel stops the batch within a step.
        gen = self.actors[0].render_batch.options(
            num_returns="streaming", _generator_backpressure_num_objects=2,
        ).remote(requests, request_ids, latent_frames_per_chunk)
        return BatchStream(self, gen, request_ids)


class BatchStream:
    """Iterates a batched render's events (RenderStream's errors: a cancel of every member
    surfaces as RenderCanceled). ``cancel()`` stops every member, ``cancel_member(i)`` one."""

    def __init__(self, group, generator, request_ids: list[str]):
        from workers.group import RenderStream  # workers.group imports this module

        self.request_ids = list(request_ids)
        self._stream = RenderStream(group, generator, "+".join(request_ids))
        self.group = group

    def cancel(self) -> None:
        for request_id in self.request_ids:
            self.group.cancel(request_id)

    def cancel_member(self, member: int) -> None:
        self.group.cancel(self.request_ids[member])

    def __iter__(self) -> Iterator[dict]:
        return iter(self._stream)
