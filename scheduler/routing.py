"""Which variant runs a job, on which tier, from which queue.

Issue #2 ships one fixed route per model; issue #4 replaces `route_job` with YAML rules
(first match wins) that return the same `Route`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from scheduler.catalog import TIERS, get_model

STITCH_QUEUE = "stitch"  # CPU-only work: concatenation, probing, thumbnails


@dataclass(frozen=True)
class Route:
    variant: str
    tier: str
    degree: int  # GPUs (ranks) per actor group
    queue: str  # Celery queue of the tier's render_segment tasks
    rule: str  # name of the rule that chose this route

    def as_dict(self) -> dict:
        return asdict(self)


_FIXED_TIER = {"wan-tiny": "cpu", "wan-toy": "cpu", "wan2.2-t2v-a14b": "a100"}


def render_queue(tier: str) -> str:
    return f"render.{tier}"


def route_job(model: str) -> Route:
    variant = get_model(model)
    tier = TIERS[_FIXED_TIER[variant.name]]
    return Route(variant=variant.name, tier=tier.name, degree=1,
                 queue=render_queue(tier.name), rule="fixed")
