"""Tensor parallelism for Wan's transformer, as a plan applied after the model is built.

The model file knows nothing of ranks (gpt-fast's way). For a group of N ranks, in every
attention (self and cross) q/k/v are split column-wise (each rank keeps heads/N heads), the
output projection row-wise (partial sums, then one all-reduce); in every FFN the first linear
column-wise, the second row-wise. Wan's q/k RMSNorm normalises across all heads
(`rms_norm_across_heads`): a rank holds only its heads, so the sum of squares is all-reduced
before dividing. Per block: three all-reduces of activations (each attention's
output, the FFN's) and four small ones (the q/k norms of both attentions).

`load_sharded` builds the expert on the meta device, applies the plan, then reads each
parameter's own slice from the safetensors files: no rank ever holds the whole expert.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn


class ColumnParallelLinear(nn.Module):
    """Output features [rank*out/N, (rank+1)*out/N) of a Linear; input replicated."""

    def __init__(self, in_features: int, out_features: int, world: int, bias: bool,
                 device=None, dtype=None):
        super().__init__()
        if out_features % world:
            raise ValueError(f"out_features {out_features} does not split over {world} ranks")
        self.weight = nn.Parameter(torch.empty(out_features // world, in_features,
                                               device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features // world, device=device,
                                             dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Input features split over the ranks; partial products are all-reduced, bias once."""

    def __init__(self, in_features: int, out_features: int, world: int, bias: bool,
                 group, device=None, dtype=None):
        super().__init__()
        if in_features % world:
            raise ValueError(f"in_features {in_features} does not split over {world} ranks")
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, in_features // world,
                                               device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device,
                                             dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out + self.bias if self.bias is not None else out


class ShardedRMSNorm(nn.Module):
    """RMSNorm over all heads' features when this rank holds 1/N of them."""

    def __init__(self, full_dim: int, world: int, eps: float, group, device=None, dtype=None):
        super().__init__()
        self.full_dim, self.eps, self.group = full_dim, eps, group
        self.weight = nn.Parameter(torch.empty(full_dim // world, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squares = x.float().pow(2).sum(-1, keepdim=True)
        dist.all_reduce(squares, group=self.group)
        normed = x.float() * torch.rsqrt(squares / self.full_dim + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


# (path of the Linear inside a block, how it is split)
_BLOCK_PLAN = {
    "attn1.to_q": "col", "attn1.to_k": "col", "attn1.to_v": "col", "attn1.to_out.0": "row",
    "attn2.to_q": "col", "attn2.to_k": "col", "attn2.to_v": "col", "attn2.to_out.0": "row",
    "ffn.net.0.proj": "col", "ffn.net.2": "row",
}


def _set(parent: nn.Module, path: str, module: nn.Module) -> None:
    *head, last = path.split(".")
    for name in head:
        parent = getattr(parent, name)
    setattr(parent, last, module)


def apply_tensor_parallel(model: nn.Module, group, rank: int, world: int) -> nn.Module:
    """Replace every block's linears and q/k norms by their shards (weights left to fill:
    `load_sharded`)."""
    heads = model.config.num_attention_heads
    if heads % world:
        raise ValueError(f"{heads} attention heads do not split over {world} ranks")
    for block in model.blocks:
        for path, how in _BLOCK_PLAN.items():
            old = block.get_submodule(path)
            kwargs = dict(device=old.weight.device, dtype=old.weight.dtype,
                          bias=old.bias is not None)
            new = (ColumnParallelLinear(old.in_features, old.out_features, world, **kwargs)
                   if how == "col" else
                   RowParallelLinear(old.in_features, old.out_features, world, group=group,
                                     **kwargs))
            _set(block, path, new)
        for attn in (block.attn1, block.attn2):
            attn.heads = heads // world
            for name in ("norm_q", "norm_k"):
                old = getattr(attn, name)
                setattr(attn, name, ShardedRMSNorm(old.weight.shape[0], world, old.eps, group,
                                                   old.weight.device, old.weight.dtype))
    model.tp_rank, model.tp_world = rank, world
    return model


def shard_slice(full_name: str, shape: torch.Size, rank: int, world: int,
                split: dict[str, int]) -> tuple[slice, ...] | None:
    """The slice of a full tensor this rank holds (None: the whole tensor)."""
    dim = split.get(full_name)
    if dim is None:
        return None
    size = shape[dim] // world
    index = [slice(None)] * len(shape)
    index[dim] = slice(rank * size, (rank + 1) * size)
    return tuple(index)


def split_dims(model: nn.Module) -> dict[str, int]:
    """Parameter name -> the dimension it is split along (absent: replicated)."""
    dims = {}
    for name, module in model.named_modules():
        if isinstance(module, ColumnParallelLinear):
            dims[f"{name}.weight"] = 0
            dims[f"{name}.bias"] = 0
        elif isinstance(module, RowParallelLinear):
            dims[f"{name}.weight"] = 1
        elif isinstance(module, ShardedRMSNorm):
            dims[f"{name}.weight"] = 0
    return dims


def load_sharded(cls, folder: str | Path, group, rank: int, world: int,
                 device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Build ``cls`` (WanTransformer3DModel) from ``folder`` on the meta device, apply the
    plan, and fill each parameter with only this rank's slice of the safetensors weights."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        model = cls.from_config(config)
    apply_tensor_parallel(model, group, rank, world)
    dims = split_dims(model)
    wanted = dict(model.named_parameters())
    wanted.update(dict(model.named_buffers()))
    keep_fp32 = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                if key not in wanted:
                    continue
                piece = fh.get_slice(key)
                index = shard_slice(key, torch.Size(piece.get_shape()), rank, world, dims)
                tensor = piece[index] if index is not None else piece[:]
                # As from_pretrained does: the modules diffusers keeps in fp32 stay fp32.
                fp32 = any(part in keep_fp32 for part in key.split("."))
                state[key] = tensor.to(device=device,
                                       dtype=torch.float32 if fp32 else dtype)
    missing = [k for k, p in model.named_parameters() if k not in state]
    if missing:
        raise ValueError(f"{folder}: no weights for {missing[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    # Buffers not in the checkpoint (rotary tables) are rebuilt on the real device.
    model.rope = type(model.rope)(**_rope_args(model)).to(device)
    return model.to(device).eval().requires_grad_(False)


def _rope_args(model: nn.Module) -> dict:
    cfg = model.config
    return dict(attention_head_dim=cfg.attention_head_dim, patch_size=cfg.patch_size,
                max_seq_len=cfg.rope_max_seq_len)
