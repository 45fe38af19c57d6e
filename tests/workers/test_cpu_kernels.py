"""workers/cpu_kernels.py: the VAE's small CPU decodes take oneDNN's conv3d and a plain
sum-of-squares RMS norm, with diffusers' own results; anything else runs diffusers' code.

Held on the shipped toy's VAE (trained weights) and on tiny VAEs of the A14B (Wan2.1 VAE)
and TI2V-5B (Wan2.2 VAE: patches, residual up blocks) layouts, through diffusers'
``AutoencoderKLWan.decode`` and the farm's ``WanT2V``."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKLWan
from torch.profiler import profile

from workers.cpu_kernels import PATCHED, use_fast_cpu_kernels
from workers.tiny_model import tiny_vae
from workers.toy import BUNDLED_DIR
from workers.wan_pipeline import WanT2V


def _vae(which: str) -> AutoencoderKLWan:
    if which == "wan-toy":
        return AutoencoderKLWan.from_pretrained(BUNDLED_DIR / "wan-toy" / "vae")
    torch.manual_seed(3)
    vae = tiny_vae(which)
    with torch.no_grad():  # norms' gains away from 1, so the norm's rewrite is exercised
        for name, param in vae.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.5)
    return vae


def _latents(vae: AutoencoderKLWan, frames: int = 17, pixels: int = 32) -> torch.Tensor:
    cfg = vae.config
    return torch.randn(1, cfg.z_dim, (frames - 1) // cfg.scale_factor_temporal + 1,
                       pixels // cfg.scale_factor_spatial, pixels // cfg.scale_factor_spatial,
                       generator=torch.Generator().manual_seed(0))


def _ops(vae: AutoencoderKLWan, z: torch.Tensor) -> tuple[torch.Tensor, set[str]]:
    with torch.no_grad(), profile() as prof:
        video = vae.decode(z).sample
    return video, {event.name for event in prof.events()}


@pytest.mark.parametrize("which", ["wan-toy", "t2v-a14b", "ti2v-5b"])
def test_fast_kernels_decode_as_diffusers_does(which):
    stock = _vae(which).eval().requires_grad_(False)
    fast = copy.deepcopy(stock)
    assert use_fast_cpu_kernels(fast) > 0
    z = _latents(stock, pixels=64 if which == "ti2v-5b" else 32)
    theirs, stock_ops = _ops(stock, z)
    ours, fast_ops = _ops(fast, z)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert theirs.std() > 0.01  # a real output, not a flat one that agrees trivially
    # torch's own pick at this size is the slow path; the swapped modules never take it.
    assert "aten::slow_conv3d_forward" in stock_ops and "aten::linalg_vector_norm" in stock_ops
    assert "aten::mkldnn_convolution" in fast_ops
    assert "aten::slow_conv3d_forward" not in fast_ops
    assert "aten::linalg_vector_norm" not in fast_ops


def test_bfloat16_and_training_run_diffusers_own_code():
    stock = _vae("t2v-a14b").eval()
    fast = copy.deepcopy(stock)
    use_fast_cpu_kernels(fast)
    z = _latents(stock)
    # bfloat16: the same calls as stock, so the same bits.
    stock_bf, fast_bf = copy.deepcopy(stock).to(torch.bfloat16), copy.deepcopy(fast)
    fast_bf.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fast_bf.decode(z.bfloat16()).sample,
                           stock_bf.decode(z.bfloat16()).sample)
    # Weights that need gradients (a decoder in training): diffusers' path, the same bits
    # out and the same gradients (the fast path's outputs differ in the last bits).
    outputs, grads = [], []
    for vae in (stock, fast):
        vae.requires_grad_(True).zero_grad()
        video = vae.decode(z).sample
        video.square().mean().backward()
        outputs.append(video.detach())
        grads.append(vae.decoder.conv_in.weight.grad)
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0
    with torch.no_grad():
        assert not torch.equal(fast.requires_grad_(False).decode(z).sample, outputs[0])


def test_applying_twice_swaps_nothing_more_and_the_pipeline_applies_it():
    vae = _vae("t2v-a14b")
    first = use_fast_cpu_kernels(vae)
    convs = sum(isinstance(m, torch.nn.Conv3d) for m in vae.modules())
    assert first >= convs and use_fast_cpu_kernels(vae) == 0
    pipe = WanT2V.from_folder(BUNDLED_DIR / "wan-toy")
    assert getattr(pipe.vae.decoder.conv_in, PATCHED)
    assert not getattr(pipe.transformer.patch_embedding, PATCHED, False)  # the VAE only
