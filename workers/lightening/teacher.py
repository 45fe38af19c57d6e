"""The base model as a teacher: captions to train on, and its own sampler trajectories.

Distillation, pruning recovery and shallower students all learn from what the base does,
not from a dataset: the base renders captions from seeded noise with its own sampler and
guidance, and the student learns to match those latents (and the base's guided noise
predictions) along the way. Held-out captions of the toy world are never trained on, so
`farm eval`'s held-out split still measures composition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.wan_pipeline import RenderRequest, WanT2V


def training_captions(prompts: list[str], seed: int, count: int) -> list[str]:
    """``count`` captions: drawn from ``prompts`` when given, else the toy world's seen
    combinations in English and Chinese (random backgrounds), never the held-out ones."""
    rng = np.random.default_rng(seed)
    if prompts:
        return [prompts[i] for i in rng.integers(len(prompts), size=count)]
    from workers.toy.world import LANGUAGES, SEEN, caption, random_scene

    return [caption(random_scene(rng, SEEN), LANGUAGES[rng.integers(len(LANGUAGES))])
            for _ in range(count)]


@dataclass
class Trajectories:
    """The base's renders, step by step, for N captions.

    latents: (N, S + 1, C, F, H, W), normalised; [:, 0] the seeded noise, [:, k] after step k
    guided: (N, S, C, F, H, W), the guided noise prediction the base used at step k
    timesteps: (S,), the sampler's t per step (0..1000); sigmas: (S + 1,)
    experts: the expert per step, "high" or "low"
    cond: (N, L, D) text embeddings of the captions; uncond: (1, L, D) of the empty prompt
    """
    latents: torch.Tensor
    guided: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    experts: list[str]
    cond: torch.Tensor
    uncond: torch.Tensor
    captions: list[str]


@torch.no_grad()
def trajectories(pipe: WanT2V, captions: list[str], seeds: list[int], steps: int,
                 guidance: tuple[float, float], frames: int, height: int, width: int,
                 batch: int = 32) -> Trajectories:
    """Render every caption with the base's sampler (``batch`` at a time through the
    experts); each sample's noise is the one `WanT2V.start` draws for its seed, so sample i
    is exactly the base's render of (captions[i], seeds[i])."""
    if len(captions) != len(seeds):
        raise ValueError(f"{len(captions)} captions but {len(seeds)} seeds")
    uncond = pipe.encode_prompt("")
    parts = [_batch(pipe, captions[i:i + batch], seeds[i:i + batch], steps, guidance, frames,
                    height, width, uncond) for i in range(0, len(captions), batch)]
    first = parts[0]
    return Trajectories(torch.cat([p.latents for p in parts]),
                        torch.cat([p.guided for p in parts]), first.timesteps, first.sigmas,
                        first.experts, torch.cat([p.cond for p in parts]), uncond, captions)


def _batch(pipe: WanT2V, captions, seeds, steps, guidance, frames, height, width,
           uncond) -> Trajectories:
    requests = [RenderRequest(c, "", frames, height, width, steps, guidance[0], guidance[1], s)
                for c, s in zip(captions, seeds)]
    states = [pipe.start(r) for r in requests]
    scheduler = states[0].scheduler  # one solver for the batch: its update is elementwise
    x = torch.cat([s.latents for s in states])
    cond = torch.cat([pipe.encode_prompt(c) for c in captions])
    n = len(captions)
    latents, guided, experts = [x.clone()], [], []
    for k, t in enumerate(scheduler.timesteps):
        expert, which = pipe.expert_for(float(t))
        scale = guidance[0] if which == "high" else guidance[1]
        both = expert(hidden_states=torch.cat([x, x]).to(expert.dtype),
                      timestep=t.expand(2 * n), encoder_hidden_states=torch.cat(
                          [cond, uncond.expand(n, -1, -1)]), return_dict=False)[0].float()
        noise_cond, noise_uncond = both[:n], both[n:]
        noise = noise_uncond + scale * (noise_cond - noise_uncond)
        x = scheduler.step(noise, t, x, return_dict=False)[0]
        latents.append(x.clone())
        guided.append(noise)
        experts.append(which)
    return Trajectories(torch.stack(latents, 1), torch.stack(guided, 1),
                        scheduler.timesteps.clone(), scheduler.sigmas.clone(), experts, cond,
                        uncond, list(captions))
