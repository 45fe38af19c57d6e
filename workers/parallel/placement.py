"""Where a two-expert model's experts live (DESIGN.md "Models"), applied after loading.

- resident: both experts on the device (the fastest switch, twice the weights);
- offload: the inactive expert waits in (pinned) CPU memory and the two swap at the
  boundary, once a render (what the official repo does with offload_model);
- split: each expert on its own group; the high-noise group hands the render (latents and
  solver state) to the low-noise group through Ray's object store, so consecutive jobs
  pipeline through the two groups and no GPU ever swaps weights (workers.split_group.SplitGroup).
"""

from __future__ import annotations

import torch
from torch import nn

from scheduler.memory import PLACEMENTS



class ExpertOffload:
    """Replaces `WanT2V.expert_for`: the expert about to run is moved to the device, the
    other one to CPU memory."""

    def __init__(self, pipeline, device: torch.device):
        self.device = device
        self._switch = pipeline.expert_for
        self._on_device = pipeline.transformer
        _to_host(pipeline.transformer_2, device)

    def expert_for(self, t: float):
        expert, which = self._switch(t)
        if expert is not self._on_device:
            _to_host(self._on_device, self.device)
            expert.to(self.device)
            self._on_device = expert
        return expert, which


def _to_host(module: nn.Module, device: torch.device) -> None:
    module.to("cpu")
    if device.type == "cuda":  # pinned pages: the copy back runs at full PCIe speed
        for p in module.parameters():
            p.data = p.data.pin_memory()


class NotOnThisGroup(nn.Module):
    """Stands for the expert that lives on the other group of a split placement."""

    def __init__(self, which: str, dtype: torch.dtype):
        super().__init__()
        self.which, self._dtype = which, dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"the {self.which}-noise expert runs on the other group "
                           "(split placement)")


def apply_placement(pipeline, placement: str, role: str | None, device: torch.device) -> None:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
    if pipeline.transformer_2 is None or placement == "resident":
        return
    if placement == "offload":
        pipeline.expert_for = ExpertOffload(pipeline, device).expert_for
        return
    if role not in ("high", "low"):
        raise ValueError(f"a split placement needs role 'high' or 'low', got {role!r}")
    # Drop the other expert: its group holds it.
    if role == "high":
        pipeline.transformer_2 = NotOnThisGroup("low", pipeline.transformer.dtype)
    else:
        pipeline.transformer = NotOnThisGroup("high", pipeline.transformer_2.dtype)
