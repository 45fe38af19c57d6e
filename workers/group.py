"""The executor: finds or creates the long-lived actors of a (variant, tier) and calls them.

Actors are named ``render:{variant}:{tier}:r{rank}`` in the ``farm`` namespace and created at
most once per cluster (``get_if_exists``); every task afterwards reuses them. Issue #5 widens
this to N ranks in one placement group; routes ask for degree 1 today.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from scheduler.catalog import Tier
from workers.actor import RemoteRenderWorker, RenderCanceled
from workers.ray_cluster import NAMESPACE

log = logging.getLogger(__name__)

ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


def actor_name(variant: str, tier: str, rank: int) -> str:
    return f"render:{variant}:{tier}:r{rank}"


class ActorGroup:
    def __init__(self, variant: str, tier: Tier, actors: list):
        self.variant, self.tier, self.actors = variant, tier, actors

    @classmethod
    def get_or_create(cls, variant: str, tier: Tier, model_dir: str, *, detached: bool,
                      ready_timeout_s: float = 600) -> "ActorGroup":
        """Reuse the named actor or create it; then wait until it has loaded and warmed up."""
        options = dict(
            name=actor_name(variant, tier.name, 0), namespace=NAMESPACE, get_if_exists=True,
            resources={tier.ray_resource: 1}, num_cpus=1, max_restarts=1, max_task_retries=0,
        )
        if detached:  # outlives the Celery process that created it
            options["lifetime"] = "detached"
        if tier.gpus_per_actor:
            options["num_gpus"] = tier.gpus_per_actor
            if tier.accelerator_type:
                options["accelerator_type"] = tier.accelerator_type
        actor = RemoteRenderWorker.options(**options).remote(variant, model_dir, 0)
        ray.get(actor.ready.remote(), timeout=ready_timeout_s)
        return cls(variant, tier, [actor])

    def render(self, request: dict, latent_frames_per_chunk: int = 4,
               request_id: str | None = None) -> "RenderStream":
        request_id = request_id or uuid.uuid4().hex
        # Backpressure: the actor runs at most two events ahead of the consumer, so a cancel
        # seen by the consumer stops the render within a step, not after all of them.
        gen = self.actors[0].render.options(
            num_returns="streaming", _generator_backpressure_num_objects=2,
        ).remote(request, request_id, latent_frames_per_chunk)
        return RenderStream(self, gen, request_id)

    def cancel(self, request_id: str) -> None:
        for actor in self.actors:
            actor.cancel.remote(request_id)

    def info(self) -> list[dict]:
        return ray.get([a.info.remote() for a in self.actors])


class RenderStream:
    """Iterates a render's events; a cancel inside the actor surfaces as RenderCanceled."""

    def __init__(self, group: ActorGroup, generator, request_id: str):
        self.group, self.generator, self.request_id = group, generator, request_id

    def cancel(self) -> None:
        self.group.cancel(self.request_id)

    def __iter__(self) -> Iterator[dict]:
        for ref in self.generator:
            try:
                yield ray.get(ref)
            except RayTaskError as exc:
                if isinstance(exc.cause, RenderCanceled):
                    raise RenderCanceled(str(exc.cause)) from None
                raise
