"""Batched renders on one actor (issue #15, item 2): like requests through the transformer
together, along the batch dimension.

Each member keeps everything that makes its video its own: its seeded noise (drawn exactly as
`WanT2V.start` draws it for a solo render), its prompt and negative-prompt embeddings, and its
own solver (one scheduler per member, so the multistep history is the member's alone and the
solver's arithmetic is the solo render's). Only the transformer's passes are shared: the
members' latents, timesteps and text embeddings are concatenated along the batch dimension,
the expert is chosen once per step (every member has the same timesteps), and classifier-free
guidance is the members' common scale. Decoding runs per member, as for a solo render, so a
member's frames equal its solo render's up to the float rounding of a batched matmul.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from workers.peak_memory import peak_bytes, reset_peak
from workers.progress_pace import paced, pace
from workers.wan_pipeline import DenoiseState, RenderRequest, WanT2V

# What members of one batch must share (issue #15: "same variant, size, frames, steps and
# guidance settings"; the variant and tier are the actor's own). The step cache too: the
# farm's route carries it, and a cached route is refused below.
BATCH_FIELDS = ("frames", "height", "width", "steps", "guidance_high", "guidance_low", "cache")


def check_batch(requests: list[dict], request_ids: list[str] | None = None) -> None:
    """Members must agree on the batch key's fields; a ValueError names the field and the
    values otherwise. Continued segments (a ``first_frame``) and step-cached routes render
    alone: the held first frame is per-member conditioning this loop does not carry, and a
    step cache decides its skips on the whole batch's residual, so a member would no longer
    equal its solo render."""
    if not requests:
        raise ValueError("a batch needs at least one request, got none")
    if request_ids is not None and (len(request_ids) != len(requests)
                                    or len(set(request_ids)) != len(request_ids)):
        raise ValueError(f"request_ids must be {len(requests)} distinct ids, one per request, "
                         f"got {request_ids!r}")
    for field in BATCH_FIELDS:
        values = [r.get(field) for r in requests]
        if any(v != values[0] for v in values[1:]):
            raise ValueError(f"batch members disagree on {field}: {values!r}")
    for i, request in enumerate(requests):
        if request.get("first_frame") is not None:
            raise ValueError(f"batch member {i} has a first_frame (a continued segment): "
                             "continued segments render alone")
    if requests[0].get("cache") is not None:
        raise ValueError(f"cache {requests[0]['cache']!r}: step-cached routes render alone "
                         "(the cache's skip decisions would be taken for the whole batch)")


@torch.no_grad()
def denoise_batch(pipe: WanT2V, reqs: list[RenderRequest],
                  dropped: Callable[[], set[int]] = set,
                  ) -> Iterator[tuple[int, int, str, list[int], list[DenoiseState]]]:
    """The sampler for every member at once, yielding (step, steps, expert, live members,
    states) after each step. ``dropped()`` names members to leave out from the next step
    on (their job was canceled); the others go on. Latents are per member, (1, z, f, h, w),
    as in `WanT2V.denoise_steps`; the transformer sees them stacked, (live, z, f, h, w)."""
    conds = [pipe.encode_prompt(r.prompt) for r in reqs]  # each (1, text_len, text_dim)
    unconds = [pipe.encode_prompt(r.negative_prompt) for r in reqs]
    states = [pipe.start(r) for r in reqs]  # seeded noise and a fresh solver, as solo
    live = list(range(len(reqs)))
    timesteps = states[0].scheduler.timesteps
    for index, t in enumerate(timesteps):
        gone = dropped()
        live = [i for i in live if i not in gone]
        if not live:
            return
        expert, which = pipe.expert_for(float(t))
        first = reqs[live[0]]
        guidance = first.guidance_high if which == "high" else first.guidance_low
        x = torch.cat([states[i].latents for i in live]).to(expert.dtype)
        timestep = pipe._timestep(expert, t, x, False)  # (live,) or (live, tokens)
        noise = pipe.guide(expert, x, timestep, torch.cat([conds[i] for i in live]),
                           torch.cat([unconds[i] for i in live]), guidance).float()
        for row, i in enumerate(live):  # each member's own solver and history
            state = states[i]
            state.latents = state.scheduler.step(noise[row:row + 1], t, state.latents,
                                                 return_dict=False)[0]
            state.step = index + 1
        yield index + 1, len(timesteps), which, list(live), states


class BatchRenderMixin:
    """RenderWorker's batched render (workers/actor.py inherits it)."""

    def render_batch(self, requests: list[dict], request_ids: list[str],
                     latent_frames_per_chunk: int = 4) -> Iterator[dict]:
        """`_batch_events`, with progress events paced as `render`'s (the first request's
        ``progress_every_s``; workers/progress_pace.py)."""
        yield from paced(self._batch_events(requests, request_ids, latent_frames_per_chunk),
                         pace(requests[0]) if requests else 0.0)

    def _batch_events(self, requests: list[dict], request_ids: list[str],
                      latent_frames_per_chunk: int) -> Iterator[dict]:
        """Stream of events, like `render`: {"kind": "progress", step, steps, expert, at,
        began, loaded, members} per denoising step for the whole batch (``members``: the
        indexes still rendering), {"kind": "dropped", "member": i} when member i's request
        was canceled (the batch goes on without it), then {"kind": "frames", "member": i,
        "frames": uint8 (T, H, W, 3), decode_s} per decoded chunk, member by member.

        A cancel drops only its member; when every member is canceled the render stops with
        RenderCanceled. Single-rank, unsplit groups only: the ranks of a parallel plan agree
        on one request at a time (workers/parallel/plan.py), so a batch on them is refused.
        """
        from workers.actor import RenderCanceled

        check_batch(requests, request_ids)
        if self.plan.world > 1 or self.role is not None:
            raise ValueError(f"batched renders run on single-rank, unsplit groups; this rank "
                             f"has plan {self.plan.name!r}, role {self.role!r}")
        began = time.time()
        reset_peak(self.device)
        reqs = [self._prepare(r) for r in requests]  # one cache setting: checked above
        self._active.update(request_ids)
        dropped: set[int] = set()

        def canceled() -> set[int]:
            return {i for i, rid in enumerate(request_ids) if rid in self._canceled}

        def newly_dropped(live: list[int]) -> Iterator[dict]:
            for i in sorted(set(range(len(reqs))) - set(live) - dropped):
                dropped.add(i)
                yield {"kind": "dropped", "member": i, "at": time.time()}

        try:
            loaded = time.time()
            states, live = None, list(range(len(reqs)))
            for step, steps, expert, live, states in denoise_batch(self.pipeline, reqs, canceled):
                yield from newly_dropped(live)
                yield {"kind": "progress", "step": step, "steps": steps, "expert": expert,
                       "at": time.time(), "began": began, "loaded": loaded, "members": live,
                       "peak_memory_bytes": peak_bytes(self.device)}
            live = [i for i in live if i not in canceled()]  # a cancel after the last step
            yield from newly_dropped(live)
            if not live:
                raise RenderCanceled(f"every member of batch {request_ids} was canceled")
            yield from self._decode_members(states, live, request_ids, latent_frames_per_chunk)
            self.renders += len(live)  # segments served, as a solo render counts one
        finally:
            self._active.difference_update(request_ids)
            self._canceled.difference_update(request_ids)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _decode_members(self, states: list[DenoiseState], live: list[int],
                        request_ids: list[str], latent_frames_per_chunk: int) -> Iterator[dict]:
        """Each live member's frames, decoded alone (as its solo render decodes); a member
        canceled while decoding is dropped, the rest go on."""
        for i in live:
            decoding = time.monotonic()
            for frames in self.pipeline.decode_chunks(states[i].latents,
                                                      latent_frames_per_chunk):
                if request_ids[i] in self._canceled:
                    yield {"kind": "dropped", "member": i, "at": time.time()}
                    break
                yield {"kind": "frames", "member": i, "frames": frames,
                       "decode_s": time.monotonic() - decoding,
                       "peak_memory_bytes": peak_bytes(self.device)}
                decoding = time.monotonic()
