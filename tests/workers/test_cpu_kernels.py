"""workers/cpu_kernels.py: the VAE's small CPU decodes take oneDNN's conv3d and a plain
sum-of-squares RMS norm, with diffusers' own results; anything else runs diffusers' code.

Held on the shipped toy's VAE (trained weights) and on tiny VAEs of the A14B (Wan2.1 VAE)
and TI2V-5B (Wan2.2 VAE: patches, residual up blocks) layouts, through diffusers'
``AutoencoderKLWan.decode`` and the farm's ``WanT2V.decode_chunks``."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from diffusers import AutoencoderKLWan
from torch.profiler import profile

from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

from workers.cpu_kernels import FastCausalConv3d, FastRMSNorm, use_fast_cpu_kernels
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


def test_bfloat16_training_and_compiling_run_diffusers_own_code():
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
    # Weights that need gradients (a decoder in training): diffusers' path (torch's own
    # pick at this size, slow_conv3d), the same bits out and the same gradients.
    outputs, grads = [], []
    for vae in (stock, fast):
        vae.requires_grad_(True).zero_grad()
        with profile() as prof:
            video = vae.decode(z).sample
        assert "aten::slow_conv3d_forward" in {e.name for e in prof.events()}
        video.square().mean().backward()
        outputs.append(video.detach())
        grads.append(vae.decoder.conv_in.weight.grad)
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0
    # Under no_grad the same weights (still requiring gradients) take the fast path, unless
    # oneDNN is switched off.
    assert "aten::mkldnn_convolution" in _ops(fast, z)[1]
    with torch.backends.mkldnn.flags(enabled=False):
        assert "aten::mkldnn_convolution" not in _ops(fast, z)[1]
    # torch.compile traces with fake tensors, which oneDNN's call does not take.
    block = torch.nn.Sequential(WanCausalConv3d(4, 4, 3, padding=1), WanRMS_norm(4, images=False))
    use_fast_cpu_kernels(block)
    x = torch.randn(1, 4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(block, backend="eager")(x), block(x))


def test_a_swapped_vae_is_still_the_same_module_to_copy_pickle_and_save():
    vae = _vae("t2v-a14b").eval().requires_grad_(False)
    keys = list(vae.state_dict())
    convs = sum(type(m) is WanCausalConv3d for m in vae.modules())
    norms = sum(type(m) is WanRMS_norm for m in vae.modules())
    assert use_fast_cpu_kernels(vae) == convs + norms > 0
    assert use_fast_cpu_kernels(vae) == 0  # a second call changes nothing
    assert list(vae.state_dict()) == keys
    z = _latents(vae)
    with torch.no_grad():
        expected = vae.decode(z).sample
        for copied in (pickle.loads(pickle.dumps(vae)), copy.deepcopy(vae)):
            assert isinstance(copied.decoder.conv_in, FastCausalConv3d)
            assert torch.equal(copied.decode(z).sample, expected)


def test_the_farm_pipeline_decodes_through_the_fast_kernels():
    pipe = WanT2V.from_folder(BUNDLED_DIR / "wan-toy")
    assert isinstance(pipe.vae.decoder.conv_in, FastCausalConv3d)
    assert isinstance(pipe.vae.decoder.norm_out, FastRMSNorm)
    assert type(pipe.transformer.patch_embedding) is torch.nn.Conv3d  # the VAE only
    with profile() as prof:
        frames = list(pipe.decode_chunks(_latents(pipe.vae)))
    ops = {e.name for e in prof.events()}
    assert "aten::mkldnn_convolution" in ops and "aten::slow_conv3d_forward" not in ops
    assert sum(f.shape[0] for f in frames) == 17
