"""Faster CPU kernels for the Wan VAE at small sizes: same modules, diffusers' results.

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

``use_fast_cpu_kernels(vae)`` turns the VAE's ``WanCausalConv3d`` and ``WanRMS_norm``
instances into the subclasses below, which take those faster calls only for float32 CPU
tensors outside autograd and outside ``torch.compile`` (whose fake tensors oneDNN's call
does not take), with oneDNN enabled; anything else (bf16, CUDA, a decoder being trained)
runs diffusers' own code. Subclasses, not per-instance functions, so a swapped VAE still
pickles, deep-copies and saves as before (same state_dict). At 1280x720 torch already picks
oneDNN for these convolutions and only the norm changes. Measured by
benchmarks/vae_decode.py; held to diffusers' results in tests/workers/test_cpu_kernels.py.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm


def _fast_path(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """float32 on CPU, oneDNN on, not being compiled, and no autograd graph to record."""
    no_graph = not torch.is_grad_enabled() or not (
        x.requires_grad or any(p.requires_grad for p in params))
    return (x.device.type == "cpu" and x.dtype == torch.float32 and no_graph
            and torch.backends.mkldnn.enabled and not torch.compiler.is_compiling())


class FastCausalConv3d(WanCausalConv3d):
    """WanCausalConv3d; its convolution through oneDNN on the fast path (the causal padding
    is done before, by WanCausalConv3d.forward, so ``self.padding`` is (0, 0, 0))."""

    def _conv_forward(self, x, weight, bias):
        params = (weight,) if bias is None else (weight, bias)
        if x.dim() == 5 and _fast_path(x, *params):  # batched (B, C, T, H, W)
            return torch.mkldnn_convolution(x, weight, bias, self.padding, self.stride,
                                            self.dilation, self.groups)
        return super()._conv_forward(x, weight, bias)


class FastRMSNorm(WanRMS_norm):
    """WanRMS_norm; F.normalize's ``x / max(||x||_2, 1e-12)`` as a sum of squares along the
    norm's dimension on the fast path (one temporary the size of ``x``)."""

    def forward(self, x):
        if not _fast_path(x, self.gamma):
            return super().forward(x)
        length = x.square().sum(1 if self.channel_first else -1, keepdim=True).sqrt()
        return x / length.clamp_min(1e-12) * self.scale * self.gamma + self.bias


SWAPS = {WanCausalConv3d: FastCausalConv3d, WanRMS_norm: FastRMSNorm}


def use_fast_cpu_kernels(module: torch.nn.Module) -> int:
    """Turn ``module``'s WanCausalConv3d and WanRMS_norm instances (exactly those classes)
    into their fast subclasses; returns how many changed (0 on a second call, or without
    oneDNN in this torch build)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    swapped = 0
    for sub in module.modules():
        fast = SWAPS.get(type(sub))
        if fast is not None:
            sub.__class__ = fast
            swapped += 1
    return swapped
