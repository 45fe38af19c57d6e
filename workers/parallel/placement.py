"""Where a two-expert model's experts live (README.md "Parallel rendering and expert placement"), decided while loading.

- resident: both experts on the device (the fastest switch, twice the weights);
- offload: both experts' weights are read into host memory (pinned when the device is CUDA,
  once, for the actor's life); the device holds one expert-sized set of buffers, and at the
  boundary the wanted expert is copied into them (what the official repo's offload_model
  does, without moving modules back and forth);
- split: each expert on its own group, each group reading only its own expert; the
  high-noise group hands the render (latents and solver state) to the low-noise group
  through Ray's object store, so consecutive jobs pipeline through the two groups and no
  GPU ever swaps weights (workers/split_group.py).

`expert_loader` is the ``load_expert`` hook of `WanT2V.from_folder` (workers/wan_pipeline.py),
so the device never holds an expert its placement does not keep there, not even while
loading (issue #11: loading both and then moving one away peaks at the resident memory).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from scheduler.memory import PLACEMENTS

EXPERT_OF_FOLDER = {"transformer": "high", "transformer_2": "low"}


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


def expert_loader(placement: str, role: str | None, inner: Callable | None = None) -> Callable:
    """The ``load_expert(cls, folder, device, dtype)`` hook for ``placement``. ``inner`` is the
    plan's own loader (a tensor-parallel shard: workers/parallel/plan.py), else
    ``from_pretrained``; the hook decides only where each expert is materialised."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
    if placement == "split" and role not in ("high", "low"):
        raise ValueError(f"a split placement needs role 'high' or 'low', got {role!r}")

    def load(cls, folder: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
        which = EXPERT_OF_FOLDER.get(Path(folder).name)
        if which is None:
            raise ValueError(f"{folder}: not an expert folder ({', '.join(EXPERT_OF_FOLDER)})")
        if placement == "split" and which != role:
            return NotOnThisGroup(which, dtype)  # never read: the other group holds it
        if placement == "offload":
            return _pin(_load(cls, folder, torch.device("cpu"), dtype, inner), device)
        return _load(cls, folder, device, dtype, inner)

    return load


def _load(cls, folder, device, dtype, inner) -> nn.Module:
    if inner is not None:
        return inner(cls, folder, device, dtype)
    model = cls.from_pretrained(folder, torch_dtype=dtype)  # read into host memory
    return model.to(device).eval().requires_grad_(False)


def _pin(module: nn.Module, device: torch.device) -> nn.Module:
    """Page-locked host memory, so the copy to the device runs at full PCIe speed and
    asynchronously; only for CUDA (a CPU device has nothing to pin for)."""
    if device.type == "cuda":
        for tensors in _slots_of(module).values():
            for mod, kind, name in tensors:
                tensor = getattr(mod, kind)[name]
                tensor.data = tensor.data.pin_memory()
    return module


def _slots_of(model: nn.Module) -> dict[str, list[tuple[nn.Module, str, str]]]:
    """Each parameter and buffer of ``model`` by its full name, as (module, "_parameters" or
    "_buffers", name) entries (a tensor shared by two modules has two)."""
    slots: dict[str, list] = {}
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for kind in ("_parameters", "_buffers"):
            for name, tensor in getattr(mod, kind).items():
                if tensor is not None:
                    slots.setdefault(f"{prefix}.{name}" if prefix else name, []).append(
                        (mod, kind, name))
    return slots


class ExpertOffload:
    """Replaces `WanT2V.expert_for`: both experts run on one set of device buffers, which
    the expert about to run is copied into (``copy_``, non-blocking from pinned memory: the
    copy is queued on the stream before the next forward, so it needs no sync)."""

    def __init__(self, pipeline, device: torch.device):
        self._switch = pipeline.expert_for
        experts = {"high": pipeline.transformer, "low": pipeline.transformer_2}
        slots = {which: _slots_of(expert) for which, expert in experts.items()}
        differ = sorted(slots["high"].keys() ^ slots["low"].keys())
        if differ:
            raise ValueError("offload needs two experts of one architecture; their "
                             f"parameters differ: {differ[:5]}")
        # The host copies: read once at load, never written again (inference only).
        self.host = {which: {name: _get(entries[0]).detach() for name, entries in s.items()}
                     for which, s in slots.items()}
        self.device_tensors: dict[str, torch.Tensor] = {}
        for name, high in self.host["high"].items():
            low = self.host["low"][name]
            if (high.shape, high.dtype) != (low.shape, low.dtype):
                raise ValueError(f"offload needs two experts of one architecture; {name} is "
                                 f"{tuple(high.shape)} {high.dtype} in the high-noise expert, "
                                 f"{tuple(low.shape)} {low.dtype} in the low-noise one")
            buffer = torch.empty_like(high, device=device)
            self.device_tensors[name] = buffer
            shared = (nn.Parameter(buffer, requires_grad=False)
                      if slots["high"][name][0][1] == "_parameters" else buffer)
            for mod, kind, attr in slots["high"][name] + slots["low"][name]:
                getattr(mod, kind)[attr] = shared  # both experts now run on these tensors
        self.holding: str | None = None
        self._fill("high")  # a render starts with the high-noise expert

    def _fill(self, which: str) -> None:
        for name, buffer in self.device_tensors.items():
            buffer.copy_(self.host[which][name], non_blocking=True)
        self.holding = which

    def expert_for(self, t: float):
        expert, which = self._switch(t)
        if which != self.holding:
            self._fill(which)
        return expert, which


def _get(entry: tuple[nn.Module, str, str]) -> torch.Tensor:
    mod, kind, name = entry
    return getattr(mod, kind)[name]


def apply_placement(pipeline, placement: str, role: str | None, device: torch.device) -> None:
    """After `WanT2V.from_folder` loaded the experts with `expert_loader`'s hook."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
    if placement == "resident":
        return
    if pipeline.transformer_2 is None:
        if placement == "split":
            raise ValueError("placement 'split' needs two experts; this model has one")
        pipeline.transformer.to(device)  # offload with one expert: nothing to swap
        return
    if placement == "offload":
        pipeline.expert_for = ExpertOffload(pipeline, device).expert_for
        return
    here, other = ((pipeline.transformer, pipeline.transformer_2) if role == "high"
                   else (pipeline.transformer_2, pipeline.transformer))
    if not isinstance(other, NotOnThisGroup):
        raise ValueError(f"split placement, role {role!r}: the other expert was loaded here "
                         "too (load with expert_loader's hook)")
    other._dtype = here.dtype  # the prompt embeddings follow the expert's dtype
