"""Ulysses sequence parallelism for Wan's transformer, applied after loading.

Each of N ranks keeps 1/N of the video tokens through every block. Self-attention needs all
tokens: q, k, v (local tokens, all heads) go through one all-to-all to (all tokens, heads/N),
attention runs on those heads, and a second all-to-all brings (local tokens, all heads) back.
Cross-attention (to the text) and the FFN are per token: no communication. The tokens are
split after the patch embedding (with their rotary angles) and gathered before unpatchify.
Weights are whole on every rank; activations are 1/N.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _seq_to_heads(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """(B, S/N, H, D) on each rank -> (B, S, H/N, D)."""
    b, s_local, h, d = x.shape
    send = x.reshape(b, s_local, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i]: rank i's tokens, my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, world * s_local, h // world, d)


def _heads_to_seq(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """(B, S, H/N, D) -> (B, S/N, H, D): the inverse of `_seq_to_heads`."""
    b, s, h_local, d = x.shape
    send = x.reshape(b, world, s // world, h_local, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: my tokens, rank j's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s // world, world * h_local, d)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding; x (B, S, H, D), cos/sin (1, S, 1, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    return out.type_as(x)


class UlyssesSelfAttention:
    """Processor for `attn1` of every block (T2V: no image context)."""

    def __init__(self, group, world: int):
        self.group, self.world = group, world

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = _rotary(query, *rotary_emb), _rotary(key, *rotary_emb)
        q, k, v = (_seq_to_heads(t, self.world, self.group) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2)).transpose(1, 2)
        out = _heads_to_seq(out.contiguous(), self.world, self.group).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out.type_as(hidden_states)))


def _split(x: torch.Tensor, rank: int, world: int, what: str) -> torch.Tensor:
    if x.shape[1] % world:
        raise ValueError(f"{what}: {x.shape[1]} tokens do not split over {world} ranks")
    return x.chunk(world, dim=1)[rank].contiguous()


def apply_sequence_parallel(model: nn.Module, group, rank: int, world: int) -> nn.Module:
    heads = model.config.num_attention_heads
    if heads % world:
        raise ValueError(f"{heads} attention heads do not split over {world} ranks")

    def split_rope(_module, _args, out):
        return tuple(_split(t, rank, world, "rotary angles") for t in out)

    def split_tokens(_module, args):
        return (_split(args[0], rank, world, "video tokens"), *args[1:])

    def gather_tokens(_module, _args, out):
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    model.rope.register_forward_hook(split_rope)
    model.blocks[0].register_forward_pre_hook(split_tokens)
    model.proj_out.register_forward_hook(gather_tokens)
    for block in model.blocks:
        block.attn1.set_processor(UlyssesSelfAttention(group, world))
    model.sp_rank, model.sp_world = rank, world
    return model
