"""How a group of ranks splits one render: tensor (tp) or sequence (sp, Ulysses) parallel,
times CFG parallel (cfg).

Ranks are laid out cfg-major: with tp=2, cfg=2, ranks 0-1 are the conditional half (one
tensor-parallel pair) and ranks 2-3 the unconditional half. Every rank runs the same
denoising loop on the same inputs; rank 0's latents are the result. Every collective has a
timeout, so a dead rank fails the group instead of hanging it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from scheduler.parallel_cost import Plan  # routes and actors name plans alike
from workers.parallel.cfg_parallel import CfgParallel
from workers.parallel.placement import NotOnThisGroup
from workers.parallel.sequence_parallel import apply_sequence_parallel
from workers.parallel.tensor_parallel import load_sharded


@dataclass
class RankGroups:
    rank: int
    tp_group: object  # the ranks sharing one forward pass (tensor or sequence parallel)
    tp_rank: int
    cfg_group: object
    cfg_half: int


def init_groups(plan: Plan, rank: int, init_file: str, backend: str,
                timeout_s: float) -> RankGroups:
    """Join the group (file store: nothing listens on a port) and build the subgroups. Every
    rank creates every subgroup, in the same order, as torch.distributed requires. A group
    is one node (STRICT_PACK), so gloo's own connections stay on loopback."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():  # a load that failed half-way may be retried
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=plan.world, timeout=timeout)
    mp = plan.model_parallel
    mp_groups = [dist.new_group(list(range(h * mp, (h + 1) * mp)), timeout=timeout)
                 for h in range(plan.cfg)]
    cfg_groups = ([dist.new_group([i, i + mp], timeout=timeout) for i in range(mp)]
                  if plan.cfg == 2 else [])
    dist.barrier()
    if rank == 0 and os.path.exists(init_file):  # everyone has joined: the file is spent
        os.unlink(init_file)
    half, mp_rank = divmod(rank, mp)
    return RankGroups(rank, mp_groups[half], mp_rank,
                      cfg_groups[mp_rank] if cfg_groups else None, half)


def pipeline_options(plan: Plan, groups: RankGroups) -> dict:
    """Keyword arguments for `WanT2V.from_folder` on this rank."""
    if plan.tp == 1:
        return {}
    return {"load_expert": lambda cls, folder, device, dtype: load_sharded(
        cls, folder, groups.tp_group, groups.tp_rank, plan.tp, device, dtype)}


def apply_after_load(pipeline, plan: Plan, groups: RankGroups) -> None:
    if plan.sp > 1:
        for expert in pipeline.experts:
            if not isinstance(expert, NotOnThisGroup):  # split: the other group's expert
                apply_sequence_parallel(expert, groups.tp_group, groups.tp_rank, plan.sp)
    if plan.cfg == 2:
        pipeline.guide = CfgParallel(groups.cfg_group, groups.cfg_half).guide


def _device() -> torch.device:
    """Where this rank's collectives run: NCCL needs CUDA tensors."""
    return (torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl" else torch.device("cpu"))


def agree_to_stop(stop: bool) -> bool:
    """All ranks stop at the same step if any was told to (a cancel reaches ranks apart)."""
    flag = torch.tensor([1 if stop else 0], device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def agree_on_request(request_id: str) -> None:
    """Every rank must be running the same request: two callers of one group could
    otherwise interleave and mix their activations without an error."""
    digest = int(hashlib.sha256(request_id.encode()).hexdigest()[:12], 16)
    values = torch.tensor([digest, -digest], dtype=torch.int64, device=_device())
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    if int(values[0]) != digest or int(-values[1]) != digest:
        raise RuntimeError(f"ranks disagree on the request ({request_id} here): "
                           "two callers used one group at once")

