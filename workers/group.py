"""The executor: finds or creates the long-lived actors of one group of a pool and calls them.

A route (variant, tier, plan, placement) has a pool of groups, as many as the tier's GPUs
hold (farm/tasks/segment_lease.py); group ``g`` of it is named ``render:{variant}:{tier}:g{g}:r{rank}``
(a parallel plan or a placement other than resident adds ``:{plan}`` / ``:{placement}``
before ``g``) in the ``farm`` namespace, and created at most once per cluster
(``get_if_exists``). A group of N ranks sits in one STRICT_PACK placement group (one node) and
meets at a rendezvous file on that node. One driver at a time: the caller that holds the
group's lease (farm/tasks/group_leases.py, farm/tasks/segment_lease.py) is the only one
that calls it (issue #11).
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from collections.abc import Iterator

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from scheduler.catalog import Tier
from scheduler.parallel_cost import parse_plan
from workers.batch_group import BatchGroupMixin
from workers.actor import RemoteRenderWorker, RenderCanceled, check_quantized_placement
from workers.ray_cluster import NAMESPACE

log = logging.getLogger(__name__)



class GroupBroken(RuntimeError):
    """A rank of a group died or a collective timed out: the group was taken down, and the
    next `get_or_create` builds a new one."""


ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError, GroupBroken)


def group_name(variant: str, tier: str, plan: str = "single", placement: str = "resident",
               role: str | None = None, replica: int = 0) -> str:
    """The group's name, as its events and leases show it: ``render:wan-toy:cpu:g1``."""
    parts = ([plan] * (plan != "single") + [placement] * (placement != "resident")
             + [role] * bool(role))
    return ":".join(["render", variant, tier, *parts, f"g{replica}"])


def actor_name(variant: str, tier: str, rank: int, plan: str = "single",
               placement: str = "resident", role: str | None = None, replica: int = 0) -> str:
    return f"{group_name(variant, tier, plan, placement, role, replica)}:r{rank}"


def _existing(names: list[str]) -> list | None:
    """Every rank of a group already in the cluster, or None."""
    try:
        return [ray.get_actor(name, namespace=NAMESPACE) for name in names]
    except ValueError:
        return None


def _take_down(names: list[str], pg_name: str) -> None:
    """What is left of a broken group: its live ranks and its placement group."""
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass
    try:
        remove_placement_group(ray.util.get_placement_group(pg_name))
    except ValueError:
        pass


def member_exists(variant: str, tier: str, plan: str, placement: str, replica: int) -> bool:
    """Whether the pool member's first actor is in the cluster (made, or being made)."""
    role = "high" if placement == "split" else None
    name = group_name(variant, tier, plan, placement, role, replica)
    return _existing([f"{name}:r0"]) is not None


def take_down_member(variant: str, tier: str, plan: str, placement: str, replica: int) -> None:
    """Kill a pool member's actors (both groups of a split pair) and give back their
    placement groups, so another pool can use the tier's GPUs (issue #11)."""
    world = parse_plan(plan).world
    for role in (("high", "low") if placement == "split" else (None,)):
        name = group_name(variant, tier, plan, placement, role, replica)
        _take_down([f"{name}:r{rank}" for rank in range(world)], f"{name}:pg")
        _HELD.pop((variant, tier, plan, placement, role, replica), None)


# Groups this process created without `detached`: their actors live only while a handle
# does, so the process keeps one (until Ray shuts down) and every segment finds them alive.
_HELD: dict[tuple, "ActorGroup"] = {}


class ActorGroup(BatchGroupMixin):
    def __init__(self, variant: str, tier: Tier, actors: list, pg=None, name: str = ""):
        self.variant, self.tier, self.actors, self.pg = variant, tier, actors, pg
        self.name = name or group_name(variant, tier.name)

    @classmethod
    def get_or_create(cls, variant: str, tier: Tier, model_dir: str, *, detached: bool,
                      plan: str = "single", placement: str = "resident", replica: int = 0,
                      cpus: int = 1, ready_timeout_s: float = 600,
                      collective_timeout_s: float = 120, quantize: str | None = None):
        """Reuse the named actors of group ``replica`` of the route's pool or create them;
        then wait until all have loaded and warmed up (a group's ranks load together: they
        meet in collectives). A split placement gives a `SplitGroup`: one group per expert.
        ``cpus``: cores per rank, and so its torch threads (Ray sets OMP_NUM_THREADS).
        ``quantize``: the variant's ``quantize_on_load`` (its actors quantize the experts as
        they load them); an existing group that loaded otherwise is refused, not reused."""
        check_quantized_placement(variant, model_dir, placement, quantize)
        if placement == "split":
            from workers.split_group import SplitGroup  # it builds on this module

            return SplitGroup(*(cls._get_or_create(variant, tier, model_dir, detached, plan,
                                                   placement, role, replica, cpus,
                                                   ready_timeout_s, collective_timeout_s,
                                                   quantize)
                                for role in ("high", "low")))
        return cls._get_or_create(variant, tier, model_dir, detached, plan, placement, None,
                                  replica, cpus, ready_timeout_s, collective_timeout_s,
                                  quantize)

    @classmethod
    def _get_or_create(cls, variant, tier, model_dir, detached, plan, placement, role, replica,
                       cpus, ready_timeout_s, collective_timeout_s,
                       quantize=None) -> "ActorGroup":
        key = (variant, tier.name, plan, placement, role, replica)
        held = _HELD.get(key)
        if held is not None and held.healthy():
            held.check_quantize(quantize, asked_before=True)
            return held
        group = cls._find_or_make(variant, tier, model_dir, detached, plan, placement, role,
                                  replica, cpus, ready_timeout_s, collective_timeout_s,
                                  quantize)
        group.key = key
        if not detached:
            _HELD[key] = group
        return group

    @classmethod
    def _find_or_make(cls, variant, tier, model_dir, detached, plan, placement, role, replica,
                      cpus, ready_timeout_s, collective_timeout_s,
                      quantize=None) -> "ActorGroup":
        world = parse_plan(plan).world
        name = group_name(variant, tier.name, plan, placement, role, replica)
        names = [f"{name}:r{rank}" for rank in range(world)]
        options = dict(namespace=NAMESPACE, get_if_exists=True, num_cpus=cpus,
                       max_restarts=0 if world > 1 else 1, max_task_retries=0)
        if detached:  # outlives the Celery process that created it
            options["lifetime"] = "detached"
        if tier.gpus_per_actor:
            options["num_gpus"] = tier.gpus_per_actor
            if tier.accelerator_type:
                options["accelerator_type"] = tier.accelerator_type
        init_file = pg = None
        if world == 1:
            options["resources"] = {tier.ray_resource: 1}
        else:
            pg_name = f"{name}:pg"
            existing = _existing(names)
            if existing is not None:
                try:
                    pg = ray.util.get_placement_group(pg_name)
                except ValueError:
                    pg = None
                group = cls(variant, tier, existing, pg, name)
                if group.healthy():
                    group.check_quantize(quantize)
                    return group
            # A rank is gone (or was never made): its peers cannot form a group again.
            _take_down(names, pg_name)
            # A restarted rank could not rejoin its group's collectives: a dead rank takes
            # the group down (max_restarts 0) and the next get_or_create builds a new one.
            bundle = {tier.ray_resource: 1, "CPU": cpus}
            if tier.gpus_per_actor:
                bundle["GPU"] = 1
                if tier.accelerator_type:  # the actors ask for it: the bundles must hold it
                    bundle[f"accelerator_type:{tier.accelerator_type}"] = 0.001
            pg = placement_group([bundle] * world, strategy="STRICT_PACK", name=pg_name,
                                 lifetime="detached" if detached else None)
            ray.get(pg.ready(), timeout=ready_timeout_s)
            init_file = os.path.join(tempfile.gettempdir(), f"farm-dist-{uuid.uuid4().hex}")
        actors = []
        for rank in range(world):
            if world > 1:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=rank)
            actors.append(RemoteRenderWorker.options(
                name=names[rank], **options,
            ).remote(variant, model_dir, rank, plan, init_file, collective_timeout_s,
                     placement=placement, role=role, quantize=quantize))
        infos = ray.get([a.ready.remote() for a in actors], timeout=ready_timeout_s)
        group = cls(variant, tier, actors, pg, name)
        group.check_quantize(quantize, infos)  # a single rank found by name may predate this
        return group

    def check_quantize(self, quantize: str | None, infos: list[dict] | None = None,
                       asked_before: bool = False) -> None:
        """The ranks quantize at load as asked: a group found by name that loaded otherwise
        (its variant's ``quantize_on_load`` changed while it lived) is not used. A group this
        process holds was checked when it was found (``asked_before``: no call to the ranks)."""
        if not asked_before or not hasattr(self, "quantize"):
            found = {info.get("quantize") for info in (infos or self.info())}
            self.quantize = found.pop() if len(found) == 1 else found
        if self.quantize != quantize:
            raise ValueError(f"group {self.name} loaded with quantize_on_load "
                             f"{self.quantize!r}, asked {quantize!r}: its actors predate the "
                             "variant's catalog entry; take the pool member down "
                             "(workers.group.take_down_member) or restart the Ray cluster")

    def latents(self, request: dict, request_id: str | None = None, state=None):
        """Every rank runs the sampler; rank 0's latents (or handover state) come back."""
        request_id = request_id or uuid.uuid4().hex
        refs = [self.actors[0].latents.remote(request, request_id, state)]
        refs += [a.follow.remote(request, request_id, state) for a in self.actors[1:]]
        return ray.get(refs)[0]

    def healthy(self, timeout_s: float = 10) -> bool:
        try:
            ray.get([a.info.remote() for a in self.actors], timeout=timeout_s)
            return True
        except (*ACTOR_LOST, ray.exceptions.GetTimeoutError):
            return False

    def kill(self) -> None:
        """Stop every rank and give the placement group's resources back."""
        _HELD.pop(getattr(self, "key", None), None)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)

    def render(self, request: dict, latent_frames_per_chunk: int = 4,
               request_id: str | None = None, state=None) -> "RenderStream":
        request_id = request_id or uuid.uuid4().hex
        # Backpressure: the actor runs at most two events ahead of the consumer (events come
        # every step, or at most every request["progress_every_s"]), so a cancel seen by
        # the consumer stops the render soon after, not after all of its steps.
        gen = self.actors[0].render.options(
            num_returns="streaming", _generator_backpressure_num_objects=2,
        ).remote(request, request_id, latent_frames_per_chunk, state)
        followers = [a.follow.remote(request, request_id, state) for a in self.actors[1:]]
        return RenderStream(self, gen, request_id, followers)

    def cancel(self, request_id: str) -> None:
        for actor in self.actors:
            actor.cancel.remote(request_id)

    def preempt(self, request_id: str) -> None:
        """Ask the render to yield at its next step (issue #15): its stream then ends with a
        {"kind": "preempted", "state": bytes, ...} event; `render(state=...)` resumes it."""
        for actor in self.actors:
            actor.preempt.remote(request_id)

    def info(self) -> list[dict]:
        return ray.get([a.info.remote() for a in self.actors])


class RenderStream:
    """Iterates a render's events; a cancel inside the actor surfaces as RenderCanceled, a
    preempt as a last "preempted" event."""

    def __init__(self, group: ActorGroup, generator, request_id: str, followers=()):
        self.group, self.generator, self.request_id = group, generator, request_id
        self.followers = list(followers)  # the other ranks' calls: their errors count too

    def cancel(self) -> None:
        self.group.cancel(self.request_id)

    def preempt(self) -> None:
        self.group.preempt(self.request_id)

    def __iter__(self) -> Iterator[dict]:
        try:
            for ref in self.generator:
                try:
                    yield ray.get(ref)
                except RayTaskError as exc:
                    if isinstance(exc.cause, RenderCanceled):
                        raise RenderCanceled(str(exc.cause)) from None
                    raise
            ray.get(self.followers)
        except (RayTaskError, *ACTOR_LOST) as exc:
            group = self.group
            if len(group.actors) > 1:
                # A rank died, or a collective failed or timed out: the ranks' process group
                # cannot be trusted again. Take it down; the next call builds a new one.
                group.kill()
                raise GroupBroken(f"a rank of group {group.name} failed; the group was taken "
                                  f"down: {exc}") from exc
            raise
