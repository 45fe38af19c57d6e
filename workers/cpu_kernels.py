"""Faster CPU kernels for the Wan VAE at small sizes: same modules, same results.

Two of torch's CPU choices make the toy's VAE decode (and any small Wan VAE on CPU) several
times slower than it needs to be (issue #12: decoding was 0.29 of the base's end-to-end
time, a floor under every variant's ratio):

- ``F.conv3d`` takes oneDNN only when N*C*D*H > 20480 (or a 4x4+ kernel, or a batch): a
  rule written for 2-D inputs that ignores a 3-D input's width. The VAE's causal 3x3x3
  convolutions at 32x32 fall to ``slow_conv3d`` (im2col + one GEMM per frame), about 4x
  slower on one thread than ``torch.mkldnn_convolution`` on the same tensors.
- ``F.normalize(x, dim=1)`` (``WanRMS_norm``) reduces over the channel dimension of a
  (B, C, T, H, W) tensor with a strided ``linalg_vector_norm``, about 15x slower than
  summing squares along that dimension.

``use_fast_cpu_kernels(vae)`` swaps those two calls on the module's instances, only for
float32 CPU tensors that need no gradient; anything else (bf16, CUDA, a decoder being
trained) runs diffusers' own code. A 720P decode of the real VAE already takes oneDNN (its
N*C*D*H is far above the cut), so this changes nothing there. Measured by
benchmarks/vae_decode.py; held to diffusers' results in tests/workers/test_cpu_kernels.py.
"""

from __future__ import annotations

import types

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

PATCHED = "_farm_fast_cpu_kernels"  # marks a module already swapped (applying twice is a no-op)


def _fast_path(x: torch.Tensor, *params) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and not x.requires_grad and not any(p.requires_grad for p in params))


def _conv3d_forward(self: torch.nn.Conv3d, x, weight, bias):
    if _fast_path(x, weight, *(() if bias is None else (bias,))):
        return torch.mkldnn_convolution(x, weight, bias, self.padding, self.stride,
                                        self.dilation, self.groups)
    return type(self)._conv_forward(self, x, weight, bias)  # the class's own, not a copy's


def _rms_norm_forward(self: WanRMS_norm, x):
    if not _fast_path(x, self.gamma):
        return type(self).forward(self, x)
    dim = 1 if self.channel_first else -1
    # F.normalize: x / max(||x||_2, 1e-12) along ``dim``
    length = x.square().sum(dim, keepdim=True).sqrt().clamp_min(1e-12)
    return x / length * self.scale * self.gamma + self.bias


def use_fast_cpu_kernels(module: torch.nn.Module) -> int:
    """Swap the slow calls in ``module``'s Conv3d and WanRMS_norm instances; returns how many
    modules were swapped. Bound to each instance, so a deep copy (or ``.to(dtype)``) of a
    swapped module stays swapped and runs on its own weights. Needs oneDNN in this torch
    build (else nothing is swapped)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    swapped = 0
    for sub in module.modules():
        if getattr(sub, PATCHED, False):
            continue
        if (isinstance(sub, torch.nn.Conv3d) and sub.padding_mode == "zeros"
                and isinstance(sub.padding, tuple)):  # not padding="same"
            sub._conv_forward = types.MethodType(_conv3d_forward, sub)
        elif isinstance(sub, WanRMS_norm):
            sub.forward = types.MethodType(_rms_norm_forward, sub)
        else:
            continue
        setattr(sub, PATCHED, True)
        swapped += 1
    return swapped
