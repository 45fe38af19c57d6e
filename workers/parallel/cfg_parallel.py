"""CFG parallelism: the conditional pass on one half of a group, the unconditional pass on the
other, at the same time; the two predictions are exchanged with one all-gather per step."""

from __future__ import annotations

import torch
import torch.distributed as dist


class CfgParallel:
    """Replaces `WanT2V.guide` on every rank of a group split into two CFG halves."""

    def __init__(self, group, half: int):
        self.group, self.half = group, half  # half 0: conditional; half 1: unconditional

    def guide(self, expert, x, timestep, cond, uncond, guidance: float) -> torch.Tensor:
        if guidance <= 1.0:  # no unconditional pass to share out: both halves do the same
            return expert(hidden_states=x, timestep=timestep, encoder_hidden_states=cond,
                          return_dict=False)[0]
        context = cond if self.half == 0 else uncond
        mine = expert(hidden_states=x, timestep=timestep, encoder_hidden_states=context,
                      return_dict=False)[0].contiguous()
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine, group=self.group)
        noise, noise_uncond = both
        return noise_uncond + guidance * (noise - noise_uncond)
