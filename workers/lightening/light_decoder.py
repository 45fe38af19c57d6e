"""``--light-decoder R``: a narrower VAE decoder trained to decode as the base's does.

A few-step student leaves the VAE as the largest cost of a draft: on the toy model, decoding
17 frames takes about a third of the base's whole render, whatever the sampler does. The
variant keeps diffusers' ``AutoencoderKLWan`` and its config, with ``decoder_base_dim`` set
to R x ``base_dim`` (the class builds its decoder from that field), so the folder still
loads with ``from_pretrained`` and in diffusers' own ``WanPipeline``. The encoder,
``quant_conv`` and ``post_quant_conv`` are the base's, unchanged (a continued segment
encodes its first frame with them); only the decoder is new.

Training data is the base's own: final latents of its renders of training captions (never
held-out ones), each also with a little Gaussian noise (a student's latents lie near, not
on, the base's), and as targets the base decoder's output for exactly those latents, so the
decoder learns the base's decoding, not a dataset's pixels. The loss is the mean squared
error of the raw decoder output (before the clamp to [-1, 1], so saturated pixels still
pass gradients); held-back renders give the reported PSNR. Checkpointed every
``checkpoint_every`` steps into the operation's scratch folder, with the training data;
``--resume`` continues from there without rendering again.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

from workers.lightening.ops import DeriveContext, DeriveError
from workers.lightening.teacher import training_captions, trajectories
from workers.wan_pipeline import WanT2V, decoded_frames

CHECKPOINT = "light-decoder.pt"
DATA = "light-decoder-data.pt"  # the base's latents and decodes, reused by --resume


def decode_raw(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """(B, z_dim, F, h, w) denormalised latents -> (B, 3, T, H, W) decoder output, unclamped,
    as workers/wan_pipeline.py decodes (with gradients when they are on)."""
    return torch.cat(list(decoded_frames(vae, z)), dim=2)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB between two videos in [-1, 1] (a peak-to-peak range of 2)."""
    mse = F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)).item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


@dataclass
class LightDecoder:
    """The operation; defaults suit the shipped toy (17 frames at 32x32, 20 steps, CFG 4)."""

    ratio: float = 0.5  # decoder width kept: decoder_base_dim = ratio x base_dim
    renders: int = 256  # base renders whose final latents are the training inputs
    validation: int = 16  # more renders, never trained on: the reported PSNR
    noise: float = 0.1  # std of the extra noisy copy of each latent (normalised units)
    train_steps: int = 1500  # 600 left the toy's draft at 75% shape retention (26 dB)
    batch: int = 8
    lr: float = 2e-3  # AdamW, cosine to lr / 20 after a short warm-up
    # The base's sampler for those renders; None: what its derive.json says it renders with
    # (a 4-step student: 4 steps, guidance 1), else 20 steps at guidance 4 (the toy's).
    steps: int | None = None
    guidance: float | None = None
    frames: int = 17
    size: int = 32
    checkpoint_every: int = 100

    name: ClassVar[str] = "light-decoder"

    def __post_init__(self):
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
            raise DeriveError(f"--light-decoder {r!r}: the decoder width kept must be a "
                              f"fraction strictly between 0 and 1")
        for field_name in ("renders", "validation", "train_steps", "batch", "checkpoint_every"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DeriveError(f"light-decoder {field_name} must be a positive whole "
                                  f"number, got {value!r}")

    def settings(self) -> dict:
        return asdict(self)

    def apply(self, ctx: DeriveContext) -> dict:
        started = time.monotonic()
        base = WanT2V.from_folder(ctx.base)
        teacher = base.vae.float().eval().requires_grad_(False)
        config = dict(teacher.config)
        width = config.get("decoder_base_dim") or config["base_dim"]
        narrow = max(1, round(width * self.ratio))
        if narrow >= width:
            raise DeriveError(f"--light-decoder {self.ratio}: keeps all {width} channels of "
                              f"the decoder's base width")
        with torch.random.fork_rng():  # the new decoder's initial weights come from the seed
            torch.manual_seed(ctx.seed)
            student = AutoencoderKLWan.from_config({**config, "decoder_base_dim": narrow})
        kept = {k: v for k, v in teacher.state_dict().items() if not k.startswith("decoder.")}
        missing, unexpected = student.load_state_dict(kept, strict=False)
        assert not unexpected and all(k.startswith("decoder.") for k in missing)
        data = self._cached_data(base, ctx)
        state = self._train(student, data, ctx)
        student.eval().requires_grad_(False)
        with torch.no_grad():
            held = decode_raw(student, data["held_z"])
        held_psnr = psnr(held, data["held_target"])
        out = ctx.work / "vae"
        shutil.rmtree(out)
        student.save_pretrained(out, safe_serialization=True)
        params = {"teacher": sum(p.numel() for p in teacher.decoder.parameters()),
                  "student": sum(p.numel() for p in student.decoder.parameters())}
        return {"method": "narrower VAE decoder (decoder_base_dim) distilled from the base's "
                          "decoder on the base's own latents",
                "decoder_base_dim": [width, narrow], "decoder_params": params,
                "training": {"renders": self.renders, "steps": state["step"],
                             "seconds": round(state["seconds"], 1),
                             "loss_curve": state["curve"]},
                "held_back_psnr_db": round(held_psnr, 2),
                "seconds": round(time.monotonic() - started, 1)}

    # ---- data --------------------------------------------------------------------------------

    def _cached_data(self, base: WanT2V, ctx: DeriveContext) -> dict:
        """``_data``, saved in the scratch folder; a resumed run with the same seed, settings
        and prompts reads it back instead of rendering again."""
        path = ctx.scratch / DATA
        key = {"seed": ctx.seed, "settings": self.settings(), "prompts": ctx.prompts}
        if ctx.resume and path.is_file():
            saved = torch.load(path, weights_only=False)
            if saved["key"] == key:
                return saved["data"]
        data = self._data(base, ctx)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "data": data}, path)
        return data

    @torch.no_grad()
    def _data(self, base: WanT2V, ctx: DeriveContext) -> dict:
        """Training and held-back latents (denormalised, as the decoder sees them) and the
        base decoder's output for each."""
        count = self.renders + self.validation
        captions = training_captions(ctx.prompts, ctx.seed, count)
        seeds = [ctx.seed * 100_003 + 7 + i for i in range(count)]
        steps, guidance = render_settings(ctx.base, self.steps, self.guidance)
        ctx.note(f"--light-decoder: rendering {count} captions with the base ({steps} steps, "
                 f"guidance {guidance})")
        final = trajectories(base, captions, seeds, steps, (guidance, guidance),
                             self.frames, self.size, self.size).latents[:, -1]
        gen = torch.Generator().manual_seed(ctx.seed)
        train = final[:self.renders]
        noisy = train + self.noise * torch.randn(train.shape, generator=gen)
        inputs = base._denormalise(torch.cat([train, noisy]))
        held = base._denormalise(final[self.renders:])
        teacher = base.vae
        return {"z": inputs, "target": torch.cat([decode_raw(teacher, inputs[i:i + 16])
                                                  for i in range(0, len(inputs), 16)]),
                "held_z": held, "held_target": decode_raw(teacher, held)}

    # ---- training ----------------------------------------------------------------------------

    def _lr(self, step: int) -> float:
        warm = min(20, self.train_steps // 10 + 1)
        if step < warm:
            return self.lr * (step + 1) / warm
        done = (step - warm) / max(1, self.train_steps - warm)
        return self.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done)))

    def _train(self, student: AutoencoderKLWan, data: dict, ctx: DeriveContext) -> dict:
        params = list(student.decoder.parameters())
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(ctx.seed + 1)
        state = {"step": 0, "seconds": 0.0, "curve": [], "window": []}
        path = ctx.scratch / CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        if ctx.resume and path.is_file():
            saved = torch.load(path, weights_only=False)
            if saved["settings"] != self.settings() or saved["seed"] != ctx.seed:
                raise DeriveError(f"--resume: {path} was written by a light-decoder run with "
                                  f"other settings ({saved['settings']}, seed {saved['seed']})")
            student.decoder.load_state_dict(saved["decoder"])
            optimizer.load_state_dict(saved["optimizer"])
            gen.set_state(saved["generator"])
            state = saved["state"]
            ctx.note(f"--light-decoder resumes at step {state['step']} of {self.train_steps}")
        student.decoder.train().requires_grad_(True)
        began = time.monotonic() - state["seconds"]
        z, target = data["z"], data["target"]
        for step in range(state["step"], self.train_steps):
            for group in optimizer.param_groups:
                group["lr"] = self._lr(step)
            idx = torch.randint(len(z), (self.batch,), generator=gen)
            loss = F.mse_loss(decode_raw(student, z[idx]), target[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            state["window"].append(loss.item())
            done = step + 1
            if len(state["window"]) == 25 or done == self.train_steps:
                state["curve"].append(round(sum(state["window"]) / len(state["window"]), 6))
                state["window"] = []
            if done % self.checkpoint_every == 0 or done == self.train_steps:
                state.update(step=done, seconds=time.monotonic() - began)
                tmp = path.with_suffix(".tmp")
                torch.save({"settings": self.settings(), "seed": ctx.seed, "state": state,
                            "decoder": student.decoder.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "generator": gen.get_state()}, tmp)
                tmp.replace(path)  # a crash mid-write leaves the last checkpoint whole
                recent = state["window"] or state["curve"][-1:]
                ctx.note(f"--light-decoder step {done}/{self.train_steps} loss "
                         f"{sum(recent) / len(recent):.5f} ({state['seconds']:.0f} s)")
        return state


def render_settings(folder, steps: int | None, guidance: float | None) -> tuple[int, float]:
    """(steps, guidance) the base renders with: as given, else the last ``render`` its
    derive.json records, else the toy's 20 steps at guidance 4."""
    from workers.lightening.manifest import read_manifest

    found = {"steps": 20, "guidance": 4.0}
    manifest = read_manifest(folder)
    while manifest is not None:
        renders = [op["render"] for op in manifest["operations"] if op.get("render")]
        if renders:
            found.update(renders[-1])
            break
        manifest = manifest["base"].get("derive")  # a chain: its own base's manifest
    return (steps if steps is not None else int(found["steps"]),
            guidance if guidance is not None else float(found["guidance"]))


def decoder_width(folder) -> int:
    """The decoder's base width a folder's VAE config declares."""
    config = json.loads((folder / "vae" / "config.json").read_text())
    return config.get("decoder_base_dim") or config["base_dim"]
