"""Wan2.2 text-to-video, loaded from a local folder in the diffusers layout.

One self-contained file for the Wan family: components are the diffusers / transformers
classes (so the real Wan2.2-T2V-A14B-Diffusers folder and the farm's small models load the
same way), and the denoising loop is written out here with the expert switch in plain sight.
No Ray and no rank logic: parallelism is applied from outside, as a plan.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from scheduler.latents import latent_shape, vae_strides
from workers.cpu_kernels import use_fast_cpu_kernels

log = logging.getLogger(__name__)

REQUIRED = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
EXPERTS = ("transformer", "transformer_2")
MAX_TEXT_LEN = 512  # Wan2.2's text_len


class ModelFolderError(ValueError):
    """The folder is not a Wan diffusers checkpoint; the message says what is missing."""


@dataclass(frozen=True)
class RenderRequest:
    prompt: str
    negative_prompt: str
    frames: int  # 4k+1
    height: int  # pixels, multiple of 16
    width: int
    steps: int
    guidance_high: float  # CFG scale while the high-noise expert runs
    guidance_low: float  # CFG scale while the low-noise expert runs
    seed: int
    # A continued segment's first frame: uint8 (height, width, 3), the previous segment's
    # last frame; held as the first latent frame (issue #11, item 7). None: text only.
    first_frame: np.ndarray | None = field(default=None, compare=False)

    def __post_init__(self):
        frame = self.first_frame
        want = (self.height, self.width, 3)
        if frame is not None and (not isinstance(frame, np.ndarray) or frame.dtype != np.uint8
                                  or frame.shape != want):
            got = (f"{frame.dtype} array of shape {frame.shape}" if isinstance(frame, np.ndarray)
                   else repr(type(frame).__name__))
            raise ValueError(f"first_frame must be a uint8 array of shape {want} (height, width, "
                             f"3), got {got}")


def _quantize_on_load(expert: torch.nn.Module, folder: Path, mode: str) -> None:
    """Quantize a just-loaded expert (an expert of a split placement's other group is a
    placeholder without weights here: nothing to do)."""
    from workers.lightening.quantize import quantize_expert

    if next(expert.parameters(), None) is None:
        return
    config = json.loads((folder / "config.json").read_text())
    if config.get("quantization_config"):
        raise ModelFolderError(f"quantize_on_load {mode!r}: {folder} is already quantized "
                               f"({config['quantization_config'].get('quant_method')}); "
                               "load it without quantize_on_load")
    quantize_expert(expert, mode)


def _load_component(folder: Path, name: str, library: str, class_name: str, dtype):
    if name == "tokenizer":
        return AutoTokenizer.from_pretrained(folder / name)
    cls = getattr(importlib.import_module(library), class_name)
    if name == "scheduler":
        return cls.from_pretrained(folder / name)
    return cls.from_pretrained(folder / name, torch_dtype=dtype)


@dataclass
class DenoiseState:
    """A render between two steps: what one expert's group hands to the other's."""
    latents: torch.Tensor
    scheduler: object  # the multistep solver, with its history of model outputs
    step: int  # steps done
    # A continued segment: the first frame's clean latent (1, z, 1, h, w) and the noise the
    # render started from there, to re-noise it to each step's level. None: text only.
    condition: torch.Tensor | None = None
    condition_noise: torch.Tensor | None = None

    def to(self, device) -> "DenoiseState":
        """Latents and every tensor the solver keeps (history, timesteps), onto ``device``."""
        self.latents = self.latents.to(device)
        if self.condition is not None:
            self.condition = self.condition.to(device)
            self.condition_noise = self.condition_noise.to(device)
        for name, value in vars(self.scheduler).items():
            if isinstance(value, torch.Tensor):
                setattr(self.scheduler, name, value.to(device))
            elif isinstance(value, list) and any(isinstance(v, torch.Tensor) for v in value):
                setattr(self.scheduler, name,
                        [v.to(device) if isinstance(v, torch.Tensor) else v for v in value])
        return self


class WanT2V:
    """Wan2.2 T2V: a text encoder, one or two transformer experts, a VAE and a scheduler."""

    def __init__(self, components: dict, boundary_ratio: float | None, device: torch.device,
                 expand_timesteps: bool = False):
        self.tokenizer = components["tokenizer"]
        self.text_encoder = components["text_encoder"]
        self.vae = components["vae"]
        use_fast_cpu_kernels(self.vae)  # small CPU decodes: torch's slow paths (cpu_kernels.py)
        self.scheduler = components["scheduler"]
        self.transformer = components["transformer"]  # high-noise expert (or the only one)
        self.transformer_2 = components.get("transformer_2")  # low-noise expert
        self.boundary_ratio = boundary_ratio
        # Wan2.2 TI2V-5B: one timestep per video token (model_index.json, as WanPipeline).
        self.expand_timesteps = bool(expand_timesteps)
        self.device = device
        # Pixels per latent cell, from the VAE's scale-factor fields (scheduler/latents.py).
        self.vae_stride_t, self.vae_stride_s = vae_strides(self.vae.config)
        self.text_len = min(MAX_TEXT_LEN, int(getattr(self.tokenizer, "model_max_length", MAX_TEXT_LEN)))

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32,
                    load_expert: Callable | None = None,
                    quantize: str | None = None) -> "WanT2V":
        """``load_expert(cls, folder, device, dtype)`` loads the transformers instead of
        ``from_pretrained`` (a tensor-parallel plan loads only its shard). ``quantize``
        (int8-weight | int8-dynamic | fp8: the catalog's ``quantize_on_load``) quantizes each
        expert right after it is loaded, on its device, as a quantized folder would hold it
        (workers/lightening/quantize.py); a folder already quantized needs no ``quantize``."""
        folder = Path(folder)
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise ModelFolderError(f"{folder} has no model_index.json: not a diffusers checkpoint")
        index = json.loads(index_path.read_text())
        missing = [name for name in REQUIRED if name not in index or not (folder / name).is_dir()]
        if missing:
            raise ModelFolderError(f"{folder} lacks component(s) {missing}")
        device = torch.device(device)
        if quantize is not None:
            from workers.lightening.quantize import check_mode

            check_mode(quantize, device, option="quantize_on_load")
        components = {}
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
                continue
            if load_expert is not None and name in EXPERTS:
                cls_ = getattr(importlib.import_module(spec[0]), spec[1])
                components[name] = load_expert(cls_, folder / name, device, dtype)
            else:
                components[name] = _load_component(folder, name, spec[0], spec[1], dtype)
                if isinstance(components[name], torch.nn.Module):
                    components[name].to(device).eval().requires_grad_(False)
            if quantize is not None and name in EXPERTS:
                _quantize_on_load(components[name], folder / name, quantize)
        return cls(components, index.get("boundary_ratio"), device,
                   index.get("expand_timesteps", False))

    @property
    def experts(self) -> list[torch.nn.Module]:
        return [m for m in (self.transformer, self.transformer_2) if m is not None]

    # ---- text ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """-> (1, text_len, text_dim); positions past the prompt's tokens are zero (as in Wan)."""
        tokens = self.tokenizer([prompt], padding="max_length", max_length=self.text_len,
                                truncation=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, mask).last_hidden_state
        dtype = self.transformer.dtype
        return (hidden * mask.unsqueeze(-1).to(hidden.dtype)).to(dtype)

    # ---- denoising ---------------------------------------------------------------------------

    def latent_shape(self, req: RenderRequest) -> tuple[int, ...]:
        """(1, z, latent frames, latent height, latent width), as WanPipeline's noise."""
        return (1, *latent_shape(self.vae.config.z_dim, (self.vae_stride_t, self.vae_stride_s),
                                 req.frames, req.height, req.width))

    def expert_for(self, t: float) -> tuple[torch.nn.Module, str]:
        """Wan2.2's switch: the high-noise expert while t >= boundary_ratio * T, then low-noise."""
        if self.transformer_2 is None or self.boundary_ratio is None:
            return self.transformer, "high"
        boundary = self.boundary_ratio * self.scheduler.config.num_train_timesteps
        return (self.transformer, "high") if t >= boundary else (self.transformer_2, "low")

    @staticmethod
    def guide(expert, x, timestep, cond, uncond, guidance: float) -> torch.Tensor:
        """Classifier-free guidance: the conditional and unconditional passes, one after the
        other. (A CFG-parallel plan replaces this with one pass per half of a group.)"""
        noise = expert(hidden_states=x, timestep=timestep, encoder_hidden_states=cond,
                       return_dict=False)[0]
        if guidance <= 1.0:
            return noise
        noise_uncond = expert(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond,
                              return_dict=False)[0]
        return noise_uncond + guidance * (noise - noise_uncond)

    def start(self, req: RenderRequest) -> "DenoiseState":
        """The sampler before its first step: seeded noise and a fresh scheduler.

        The noise is drawn as diffusers' WanPipeline draws it (``randn_tensor`` with a CPU
        generator seeded with ``req.seed``, float32), so one seed gives both the same video.
        """
        generator = torch.Generator("cpu").manual_seed(req.seed)
        latents = torch.randn(self.latent_shape(req), generator=generator, dtype=torch.float32)
        scheduler = type(self.scheduler).from_config(self.scheduler.config)  # fresh per render
        scheduler.set_timesteps(req.steps, device=self.device)
        state = DenoiseState(latents.to(self.device), scheduler, 0)
        if req.first_frame is not None:
            state.condition = self.encode_frame(req.first_frame)
            state.condition_noise = state.latents[:, :, :1].clone()
            self._hold_first_frame(state)
        return state

    @torch.no_grad()
    def encode_frame(self, frame: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> its normalised latent (1, z, 1, H/s, W/s), float32: one frame is
        one latent frame of Wan's causal VAE (as Wan's image-to-video conditioning)."""
        vae = self.vae
        x = torch.from_numpy(np.ascontiguousarray(frame)).to(self.device, vae.dtype)
        x = x.permute(2, 0, 1)[None, :, None] / 127.5 - 1.0  # (1, 3, 1, H, W) in [-1, 1]
        z = vae.encode(x).latent_dist.mode()
        cfg = vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z)
        return ((z - mean) / std).float()

    def _hold_first_frame(self, state: "DenoiseState") -> None:
        """Put the held first latent frame at the level of the next step (issue #11, item 7).

        Flow matching: x_t = (1 - sigma) * x0 + sigma * noise, sigma the scheduler's for step
        ``state.step`` (0 after the last step: the clean frame). A per-token-timestep model
        (expand_timesteps, the 5B) takes the frame clean with timestep 0 instead, as Wan2.2's
        TI2V does.
        """
        if state.condition is None:
            return
        sigma = 0.0 if self.expand_timesteps else float(state.scheduler.sigmas[state.step])
        held = (1.0 - sigma) * state.condition + sigma * state.condition_noise
        state.latents[:, :, :1] = held.to(state.latents)

    def _timestep(self, expert, t: torch.Tensor, latents: torch.Tensor,
                  held: bool) -> torch.Tensor:
        """(batch,) for Wan2.1/A14B; (batch, tokens) with ``expand_timesteps``: t for every
        video token, built as WanPipeline builds it (float32), 0 for a held first frame."""
        if not self.expand_timesteps:
            return t.expand(latents.shape[0])
        _, ph, pw = expert.config.patch_size
        f, h, w = latents.shape[2:]
        mask = torch.ones((f, h // ph, w // pw), dtype=torch.float32, device=latents.device)
        if held:
            mask[0] = 0.0
        return (mask * t).flatten().unsqueeze(0).expand(latents.shape[0], -1)

    @torch.no_grad()
    def denoise_steps(self, req: RenderRequest, state: "DenoiseState | None" = None,
                      stop_before: str | None = None
                      ) -> Iterator[tuple[int, int, str, torch.Tensor]]:
        """Run the sampler step by step, yielding (step, steps, expert, latents) after each.

        Latents are normalised, shape ``latent_shape(req)``. A caller
        that stops iterating stops the render within one step. ``state`` continues a render
        (its latents and scheduler, with the solver's history); ``stop_before="low"`` ends it
        at the expert boundary, ``state`` then holding what the low-noise expert continues
        from (the split placement: each expert on its own group).
        """
        cond = self.encode_prompt(req.prompt)
        uncond = self.encode_prompt(req.negative_prompt)
        state = state or self.start(req)
        timesteps = state.scheduler.timesteps
        while state.step < len(timesteps):
            t = timesteps[state.step]
            expert, which = self.expert_for(float(t))
            if which == stop_before:
                return
            guidance = req.guidance_high if which == "high" else req.guidance_low
            x = state.latents.to(expert.dtype)
            timestep = self._timestep(expert, t, x, state.condition is not None)
            noise = self.guide(expert, x, timestep, cond, uncond, guidance)
            state.latents = state.scheduler.step(noise.float(), t, state.latents,
                                                 return_dict=False)[0]
            state.step += 1
            self._hold_first_frame(state)
            yield state.step, len(timesteps), which, state.latents

    def denoise(self, req: RenderRequest,
                on_step: Callable[[int, int, str], None] | None = None) -> torch.Tensor:
        """The whole sampler; ``on_step(i, n, expert)`` after each step. Returns latents."""
        latents = None
        for step, steps, which, latents in self.denoise_steps(req):
            if on_step is not None:
                on_step(step, steps, which)
        return latents

    # ---- decoding ----------------------------------------------------------------------------

    def _denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)
        return latents * std.to(latents) + mean.to(latents)

    @torch.no_grad()
    def decode_chunks(self, latents: torch.Tensor, latent_frames_per_chunk: int = 4
                      ) -> Iterator[np.ndarray]:
        """Decode in temporal chunks, yielding uint8 frames (T, H, W, 3) chunk by chunk.

        Wan's VAE is causal in time and decodes one latent frame at a time with a feature
        cache; running that loop here lets frames leave before the whole clip is decoded,
        so peak memory is one chunk, not the whole video.
        """
        vae = self.vae
        z = self._denormalise(latents.to(self.device, vae.dtype))
        frames, pending = decoded_frames(vae, z), []
        try:
            for i, out in enumerate(frames):
                pending.append(out)
                if len(pending) == latent_frames_per_chunk or i == z.shape[2] - 1:
                    yield _to_uint8(torch.cat(pending, dim=2), vae.config.patch_size)
                    pending = []
        finally:
            frames.close()  # a consumer that stops early empties the VAE's cache too


def decoded_frames(vae, z: torch.Tensor) -> Iterator[torch.Tensor]:
    """Diffusers' causal decode, one latent frame at a time with the VAE's feature cache:
    denormalised latents (B, z_dim, F, h, w) -> decoder output per latent frame
    (B, 3, T_f, H, W), unclamped (also what workers/lightening/light_decoder.py trains on)."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    try:
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            yield vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map,
                              feat_idx=vae._conv_idx, first_chunk=(i == 0))
    finally:
        vae.clear_cache()


def _to_uint8(video: torch.Tensor, patch_size) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    if patch_size is not None:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
        video = unpatchify(video, patch_size=patch_size)
    video = video.clamp(-1, 1)[0].permute(1, 2, 3, 0).float()
    return ((video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
