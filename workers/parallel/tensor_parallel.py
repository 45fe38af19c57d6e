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

Quantized experts (workers/lightening/quantize.py): a rank's int8 Linear is the slice of the
unsharded one's, int8 data and per-row scales alike. From a quantized folder, each quantized
Linear is read whole (int8, one at a time) and sliced with torchao's own slicing; quantized
at load (`quantize_row_parallel`), a row-parallel shard takes each row's scale from the row's
largest magnitude over all ranks. With int8 dynamic activations, a row-parallel Linear scales
each token by its largest activation over all ranks' features, as the unsharded Linear does.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
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
        weight = self.weight
        if getattr(weight, "act_quant_kwargs", None) is not None:
            weight = _with_token_scales(weight, x, self.group)
        out = nn.functional.linear(x, weight)
        dist.all_reduce(out, group=self.group)
        return out + self.bias if self.bias is not None else out


def _symmetric_int8_scale(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's own int8 symmetric (scale, zero point) for rows whose largest magnitude is
    ``amax`` (..., 1): the same function and arguments as torchao's Int8Tensor.from_hp, on
    rows [amax, 0], whose min and max give the symmetric scale the whole row gives (it reads
    nothing else), so a shard's scales equal the unsharded ones bit for bit."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine

    rows = torch.cat([amax, torch.zeros_like(amax)], dim=-1)
    return choose_qparams_affine(
        input=rows, mapping_type=MappingType.SYMMETRIC, block_size=(1,) * (rows.ndim - 1) + (2,),
        target_dtype=torch.int8, quant_min=-128, quant_max=127, scale_dtype=torch.float32,
        zero_point_dtype=torch.int8, keepdim=True, eps=torch.finfo(torch.float32).eps)


def _row_amax(t: torch.Tensor, group) -> torch.Tensor:
    """(..., 1): each row's largest |value| over every rank's columns (exact: a max)."""
    amax = t.detach().abs().amax(dim=-1, keepdim=True).float()
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax.to(t.dtype)


def _with_token_scales(weight, x: torch.Tensor, group):
    """The int8 weight with the activation's per-token scale fixed to the whole token's
    (torchao's static-activation-scale path), so every rank quantizes its slice of a token
    as the unsharded Linear quantizes the token. Only the wrapper is new; no data is copied."""
    from torchao.quantization import Int8Tensor, PerRow

    kwargs = weight.act_quant_kwargs
    if not isinstance(kwargs.granularity, PerRow) or kwargs.reduce_range or \
            kwargs.mapping_type.name != "SYMMETRIC":
        raise ValueError("tensor parallelism supports int8 dynamic activations scaled per "
                         f"token, symmetric; got {kwargs}")
    scale, zero = _symmetric_int8_scale(_row_amax(x, group))
    return Int8Tensor(weight.qdata, weight.scale, weight.block_size, weight.dtype,
                      zero_point=weight.zero_point, act_quant_scale=scale,
                      act_quant_zero_point=zero, act_quant_kwargs=kwargs,
                      reduce_range=weight.reduce_range)


def quantize_row_parallel(module: "RowParallelLinear", config) -> None:
    """Quantize a row-parallel shard (out, in/N) with each output row's scale taken over
    the whole row (all ranks): the int8 data is then the slice of the unsharded Linear's.
    One all-reduce; every rank of the group calls it for the same modules in the same order."""
    from torchao.quantization import Int8Tensor, PerRow, quantize_

    full_precision = module.weight.detach()
    amax = _row_amax(full_precision, module.group)
    # torchao's own transform first: it decides the weight's activation settings.
    quantize_(module, config, filter_fn=lambda m, _: m is module)
    local = module.weight
    if not isinstance(local, Int8Tensor) or not isinstance(_weight_granularity(config), PerRow):
        raise ValueError(f"tensor parallelism supports per-row int8 weights; got "
                         f"{type(config).__name__}")
    scale, zero = _symmetric_int8_scale(amax)
    module.weight = nn.Parameter(Int8Tensor.from_hp(
        full_precision, PerRow(), scale=scale, zero_point=zero,
        act_quant_kwargs=local.act_quant_kwargs, reduce_range=local.reduce_range),
        requires_grad=False)


def _weight_granularity(config):
    granularity = getattr(config, "granularity", None)
    return granularity[-1] if isinstance(granularity, (list, tuple)) else granularity


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
    plan, and fill each parameter with only this rank's slice of the safetensors weights
    (a quantized folder's int8 Linears: this rank's slice of each, scales included)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    quantized = config.pop("quantization_config", None) is not None
    with torch.device("meta"):
        model = cls.from_config(config)
    apply_tensor_parallel(model, group, rank, world)
    dims = split_dims(model)
    wanted = dict(model.named_parameters())
    wanted.update(dict(model.named_buffers()))
    keep_fp32 = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())
    state = {}
    paths = sorted(folder.glob("*.safetensors"))
    if quantized:
        state.update(_quantized_shards(paths, rank, world, dims, device))
    for path in paths:
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


def _quantized_shards(paths: list[Path], rank: int, world: int, dims: dict[str, int],
                      device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's slice of every torchao-quantized tensor of the folder's safetensors
    (diffusers' torchao layout: flattened parts ``<module>._weight_<part>``, which a sharded
    checkpoint may put in different files; tensor types in each file's metadata). Each is
    rebuilt whole on the CPU (int8: a quarter of the fp32 bytes, one Linear at a time),
    sliced by torchao's own slicing (the per-row scales go with the rows), copied out of the
    whole, and moved to ``device``; the whole is dropped before the next one."""
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
    from torchao.prototype.safetensors.safetensors_utils import is_metadata_torchao

    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(p), framework="pt")) for p in paths]
        metadata, where = {}, {}
        for fh in files:
            metadata.update(fh.metadata() or {})
            where.update({key: fh for key in fh.keys()})
        if not is_metadata_torchao(metadata):
            return {}
        shards = {}
        for name in json.loads(metadata["tensor_names"]):
            if json.loads(metadata[name]).get("_type") == "Tensor":
                continue  # a plain tensor: read (and sliced) under its own name
            module, attr = name.rsplit(".", 1)
            prefix = f"{module}._{attr}_"
            parts = {key: fh.get_tensor(key) for key, fh in where.items()
                     if key.startswith(prefix)}
            whole = unflatten_tensor_state_dict(
                parts, {"tensor_names": json.dumps([name]), name: metadata[name]})[0][name]
            index = shard_slice(name, whole.shape, rank, world, dims)
            piece = whole[index] if index is not None else whole
            # A slice is a view of the whole; its own copy lets the whole go.
            shards[name] = piece._apply_fn_to_data(lambda t: t.contiguous().clone()).to(device)
        return shards


def _rope_args(model: nn.Module) -> dict:
    cfg = model.config
    return dict(attention_head_dim=cfg.attention_head_dim, patch_size=cfg.patch_size,
                max_seq_len=cfg.rope_max_seq_len)
