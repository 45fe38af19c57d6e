"""Train the farm's small Wan2.2-architecture model on the procedural world, from nothing.

Three stages, seeded:
1. the VAE (`AutoencoderKLWan`) learns to reconstruct clips (Adam 1e-4 with warm-up and
   gradient clipping: at 1e-3 it collapses for good);
2. a fixed set of training clips is encoded once; the latents' per-channel mean and std go
   into the VAE config (`latents_mean` / `latents_std`), as in Wan;
3. the text encoder (`UMT5EncoderModel`) and the two experts (`WanTransformer3DModel`) learn
   together by flow matching: x_t = (1 - s) x0 + s noise, target noise - x0, the high-noise
   expert on s >= 0.875 and the low-noise expert below, captions in English or Chinese at
   random and 10% empty (for classifier-free guidance).
The result is saved with `WanPipeline.save_pretrained`: the same layout as Wan2.2-T2V-A14B.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from workers.tiny_model import build_tokenizer
from workers.toy.world import LANGUAGES, SEEN, caption, random_scene, render_clip, vocabulary

log = logging.getLogger(__name__)

BOUNDARY = 0.875  # sigma at which the low-noise expert takes over (Wan2.2 T2V-A14B)
FLOW_SHIFT = 3.0
TEXT_LEN = 32


@dataclass(frozen=True)
class ToyConfig:
    seed: int = 0
    frames: int = 17
    size: int = 32
    vae_steps: int = 700
    vae_batch: int = 4
    vae_lr: float = 1e-4
    n_latent_clips: int = 5000
    dit_steps: int = 10000
    dit_batch: int = 64  # split evenly between the two experts
    dit_lr: float = 4e-4
    caption_dropout: float = 0.1


def make_vae() -> AutoencoderKLWan:
    # Wan2.1's VAE, one spatial level fewer: stride 4x4x4, so 17x32x32 clips -> 8x5x8x8.
    # (At stride 8 a 32x32 frame is a 4x4 latent, and shapes did not survive the round trip.)
    vae = AutoencoderKLWan(base_dim=16, z_dim=8, dim_mult=[1, 2, 4], num_res_blocks=1,
                           temperal_downsample=[True, True])
    # Identity statistics until `encode_dataset` measures the real ones.
    vae.register_to_config(latents_mean=[0.0] * 8, latents_std=[1.0] * 8)
    return vae


def make_expert() -> WanTransformer3DModel:
    return WanTransformer3DModel(
        # Patch (1, 2, 2), Wan's own, over the 8x8 latents: 5 x 4 x 4 = 80 tokens a clip.
        # (With (1, 4, 4), 20 tokens, every shape came out a blob: 50% shape accuracy.)
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=8,
        out_channels=8, text_dim=64, freq_dim=64, ffn_dim=256, num_layers=4,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )


def make_text_encoder(vocab_size: int) -> UMT5EncoderModel:
    return UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=16, relative_attention_max_distance=32, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def clip_batch(rng: np.random.Generator, n: int, cfg: ToyConfig):
    scenes = [random_scene(rng, SEEN) for _ in range(n)]
    clips = np.stack([render_clip(s, rng, cfg.frames, cfg.size, cfg.size) for s in scenes])
    video = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # (B,3,T,H,W)
    return scenes, video


def _warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(cfg: ToyConfig, rng: np.random.Generator, vae: AutoencoderKLWan | None = None,
              save_to: Path | None = None, save_every: int = 200) -> AutoencoderKLWan:
    """Train a new VAE, or continue ``vae``; saved to ``save_to`` every ``save_every`` steps."""
    vae = (vae or make_vae()).train()
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    started = time.monotonic()
    for step in range(cfg.vae_steps):
        _, video = clip_batch(rng, cfg.vae_batch, cfg)
        posterior = vae.encode(video).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # Object pixels (far from the frame's border colour) weigh 5x: they are few.
        border = video[..., :1, :1]
        weight = 1 + 4 * ((video - border).abs().sum(1, keepdim=True) > 0.3).float()
        mse = ((recon - video) ** 2 * weight).mean()
        kl = posterior.kl().mean()
        loss = mse + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            log.info("vae step %d/%d mse %.4f kl %.1f (%.0fs)", step, cfg.vae_steps,
                     mse.item(), kl.item(), time.monotonic() - started)
        if save_to is not None and (step + 1) % save_every == 0:
            vae.save_pretrained(save_to)
    if save_to is not None:
        vae.save_pretrained(save_to)
    return vae.eval()


@torch.no_grad()
def encode_dataset(vae: AutoencoderKLWan, cfg: ToyConfig, rng: np.random.Generator):
    """-> (latents (N, z, T', h, w) raw, scenes); sets the VAE's latents_mean / latents_std."""
    latents, scenes = [], []
    for start in range(0, cfg.n_latent_clips, 64):
        batch_scenes, video = clip_batch(rng, min(64, cfg.n_latent_clips - start), cfg)
        latents.append(vae.encode(video).latent_dist.mode())
        scenes += batch_scenes
    latents = torch.cat(latents)
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    log.info("encoded %d clips; latent std per channel %s", len(scenes),
             [round(v, 3) for v in std.tolist()])
    return (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1), scenes


def _shifted_sigma(u: torch.Tensor) -> torch.Tensor:
    return FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)


def _save_denoisers(out: Path, text_encoder, high, low) -> None:
    for name, module in (("text_encoder", text_encoder), ("transformer", high),
                         ("transformer_2", low)):
        module.save_pretrained(out / name, safe_serialization=True)


def train_denoisers(latents: torch.Tensor, scenes, tokenizer, cfg: ToyConfig,
                    rng: np.random.Generator, gen: torch.Generator, out: Path,
                    save_every: int = 2000):
    """Trains the text encoder and both experts; the folder ``out`` (already laid out) gets
    their weights every ``save_every`` steps and at the end."""
    text_encoder = make_text_encoder(len(tokenizer)).train()
    high, low = make_expert().train(), make_expert().train()
    params = [*text_encoder.parameters(), *high.parameters(), *low.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.dit_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _warmup_cosine(s, cfg.dit_steps, 200))
    u_boundary = BOUNDARY / (FLOW_SHIFT - (FLOW_SHIFT - 1) * BOUNDARY)  # shifted(u) = 0.875
    half = cfg.dit_batch // 2
    started = time.monotonic()
    for step in range(cfg.dit_steps):
        idx = rng.integers(len(scenes), size=cfg.dit_batch)
        texts = ["" if rng.random() < cfg.caption_dropout else
                 caption(scenes[i], LANGUAGES[rng.integers(2)]) for i in idx]
        tokens = tokenizer(texts, padding="max_length", max_length=TEXT_LEN, truncation=True,
                           return_tensors="pt")
        hidden = text_encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
        hidden = hidden * tokens.attention_mask.unsqueeze(-1)  # zero past the prompt, as Wan
        x0 = latents[torch.from_numpy(idx)]
        noise = torch.randn(x0.shape, generator=gen)
        u = torch.rand(cfg.dit_batch, generator=gen)
        sigma = torch.cat([BOUNDARY + (1 - BOUNDARY) * u[:half],  # high-noise expert
                           _shifted_sigma(u[half:] * u_boundary)])  # low-noise expert
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        target = noise - x0
        loss = 0.0
        for expert, part in ((high, slice(0, half)), (low, slice(half, None))):
            pred = expert(hidden_states=x_t[part], timestep=sigma[part] * 1000,
                          encoder_hidden_states=hidden[part], return_dict=False)[0]
            loss = loss + F.mse_loss(pred, target[part])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == cfg.dit_steps - 1:
            log.info("denoiser step %d/%d loss %.4f lr %.2e (%.0fs)", step, cfg.dit_steps,
                     loss.item(), sched.get_last_lr()[0], time.monotonic() - started)
        if (step + 1) % save_every == 0:
            _save_denoisers(out, text_encoder, high, low)
    _save_denoisers(out, text_encoder, high, low)
    return text_encoder.eval(), high.eval(), low.eval()


def train_toy_model(out: str | Path, cfg: ToyConfig = ToyConfig(), reuse_vae: bool = False,
                    vae_only: bool = False) -> Path:
    """Build the whole model from nothing and save it to ``out`` (diffusers layout).

    The VAE is saved to ``out/vae`` as it trains. ``reuse_vae`` starts from that one: with
    ``vae_only`` it trains it ``cfg.vae_steps`` more steps and stops; otherwise it keeps it
    as it is and trains the text encoder and the experts."""
    out = Path(out)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    tokenizer = build_tokenizer(vocabulary(), TEXT_LEN)
    started = time.monotonic()
    vae = AutoencoderKLWan.from_pretrained(out / "vae") if reuse_vae else None
    if vae is None or vae_only:
        vae = train_vae(cfg, rng, vae, save_to=out / "vae")
    if vae_only:
        return out / "vae"
    latents, scenes = encode_dataset(vae, cfg, rng)  # also sets the VAE's latent statistics
    # The whole layout first (experts untrained), so the folder loads at every checkpoint.
    _save_pipeline(out, tokenizer, make_text_encoder(len(tokenizer)), vae, make_expert(),
                   make_expert())
    train_denoisers(latents, scenes, tokenizer, cfg, rng, gen, out)
    log.info("toy model written to %s in %.0f s", out, time.monotonic() - started)
    return out


def _save_pipeline(out: Path, tokenizer, text_encoder, vae, high, low) -> Path:
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=FLOW_SHIFT)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=scheduler, transformer=high, transformer_2=low,
                       boundary_ratio=BOUNDARY)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def save_untrained(out: str | Path, seed: int = 0) -> Path:
    """The same architecture with random weights: what the yardstick must score at chance."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(vocabulary(), TEXT_LEN)
    return _save_pipeline(Path(out), tokenizer, make_text_encoder(len(tokenizer)), make_vae(),
                          make_expert(), make_expert())
