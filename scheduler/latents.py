"""Latent volume: the one place that turns frames and pixels into the VAE's latent grid.

The catalog (scheduler/catalog.py), the cost model (scheduler/parallel_cost.py) and the
pipeline (workers/wan_pipeline.py) all call `latent_shape`, with strides read from the VAE's
config by `vae_strides` (diffusers' fields `scale_factor_temporal` / `scale_factor_spatial`,
issue #11), so the farm and diffusers' own WanPipeline never disagree about a latent's size.
Pure: no torch.
"""

from __future__ import annotations

from collections.abc import Mapping


def vae_strides(vae_config: Mapping) -> tuple[int, int]:
    """(temporal, spatial) pixels per latent cell, as diffusers' WanPipeline reads them.

    A VAE config without the scale-factor fields (older diffusers) falls back to what its
    downsampling layout implies: 2 per temporal downsample; 2 per spatial level, times the
    patch size when the VAE patchifies (Wan2.2's 5B VAE: 16 = 8 x patch 2).
    """
    temporal = vae_config.get("scale_factor_temporal")
    spatial = vae_config.get("scale_factor_spatial")
    downsample = vae_config.get("temperal_downsample") or [False, True, True]
    if temporal is None:
        temporal = 2 ** sum(bool(d) for d in downsample)
    if spatial is None:
        spatial = 2 ** len(downsample) * (vae_config.get("patch_size") or 1)
    return int(temporal), int(spatial)


def latent_shape(channels: int, strides: tuple[int, int], frames: int, height: int,
                 width: int) -> tuple[int, int, int, int]:
    """-> (channels, latent frames, latent height, latent width) for a clip of ``frames``
    (4k+1) frames of ``height`` x ``width`` pixels; Wan's VAE is causal, so the first frame
    has a latent frame of its own."""
    temporal, spatial = strides
    return channels, (frames - 1) // temporal + 1, height // spatial, width // spatial


def latent_elements(channels: int, strides: tuple[int, int], frames: int, height: int,
                    width: int) -> int:
    c, t, h, w = latent_shape(channels, strides, frames, height, width)
    return c * t * h * w
