"""How a group of ranks splits one render: tensor parallel (tp) x CFG parallel (cfg).

Ranks are laid out cfg-major: with tp=2, cfg=2, ranks 0-1 are the conditional half (one
tensor-parallel pair) and ranks 2-3 the unconditional half. Every rank runs the same
denoising loop on the same inputs; rank 0's latents are the result. Every collective has a
timeout, so a dead rank fails the group instead of hanging it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from workers.parallel.cfg_parallel import CfgParallel
from workers.parallel.tensor_parallel import load_sharded


@dataclass(frozen=True)
class ParallelPlan:
    tp: int = 1
    cfg: int = 1  # 1 or 2

    def __post_init__(self):
        if self.tp < 1 or self.cfg not in (1, 2):
            raise ValueError(f"tp must be >= 1 and cfg 1 or 2, got tp={self.tp} cfg={self.cfg}")

    @property
    def world(self) -> int:
        return self.tp * self.cfg

    @property
    def name(self) -> str:
        parts = [f"tp{self.tp}"] if self.tp > 1 else []
        parts += ["cfg2"] if self.cfg == 2 else []
        return "+".join(parts) or "single"

    @classmethod
    def parse(cls, text: str) -> "ParallelPlan":
        """"tp2", "cfg2", "tp2+cfg2", "single"."""
        tp, cfg = 1, 1
        for part in filter(None, text.split("+")):
            if part == "single":
                continue
            if part.startswith("tp") and part[2:].isdigit():
                tp = int(part[2:])
            elif part == "cfg2":
                cfg = 2
            else:
                raise ValueError(f"parallel plan {text!r}: unknown part {part!r}; "
                                 "use tpN, cfg2 or tpN+cfg2")
        return cls(tp, cfg)


@dataclass
class RankGroups:
    rank: int
    tp_group: object
    tp_rank: int
    cfg_group: object
    cfg_half: int


def init_groups(plan: ParallelPlan, rank: int, init_file: str, backend: str,
                timeout_s: float) -> RankGroups:
    """Join the group (file store: nothing listens on a port) and build the subgroups. Every
    rank creates every subgroup, in the same order, as torch.distributed requires."""
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=plan.world, timeout=timedelta(seconds=timeout_s))
    tp_groups = [dist.new_group(list(range(h * plan.tp, (h + 1) * plan.tp)))
                 for h in range(plan.cfg)]
    cfg_groups = [dist.new_group([i, i + plan.tp]) for i in range(plan.tp)] \
        if plan.cfg == 2 else []
    half, tp_rank = divmod(rank, plan.tp)
    return RankGroups(rank, tp_groups[half], tp_rank,
                      cfg_groups[tp_rank] if cfg_groups else None, half)


def pipeline_options(plan: ParallelPlan, groups: RankGroups) -> dict:
    """Keyword arguments for `WanT2V.from_folder` on this rank."""
    if plan.tp == 1:
        return {}
    return {"load_expert": lambda cls, folder, device, dtype: load_sharded(
        cls, folder, groups.tp_group, groups.tp_rank, plan.tp, device, dtype)}


def apply_after_load(pipeline, plan: ParallelPlan, groups: RankGroups) -> None:
    if plan.cfg == 2:
        pipeline.guide = CfgParallel(groups.cfg_group, groups.cfg_half).guide


def agree_to_stop(stop: bool) -> bool:
    """All ranks stop at the same step if any was told to (a cancel reaches ranks apart)."""
    flag = torch.tensor([1 if stop else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())

