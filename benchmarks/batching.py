"""Batched renders against the solo loop (issue #15, item 2): toy-model drafts, jobs per
minute at batch 1, 2, 4, 8 on this machine, in one process run.

Each size renders the same jobs (their own prompts and seeds) twice: one at a time through
the solo loop (`WanT2V.denoise` + chunked decode, what an actor runs per segment) and in
batches through the batched loop (workers/batch_render.py `denoise_batch`, then each
member's decode). Printed per size: jobs per minute of both, the batched loop's gain, the
the denoising loop's gain alone (the decode runs per member either way), the
max |solo - batched| of the outputs (normalised latents, and decoded frames in 1/255), and
the ``batch_marginal`` it implies for the catalog (scheduler/batching.py `batch_seconds`:
a batch of n takes solo * (1 + (n - 1) * marginal); 1.0 is no gain). Then where batching
stops paying (the first size whose jobs per minute gain less than ``--pays`` over the size
before), and, last, the ratio batched / solo jobs per minute at the best size.

    .venv/bin/python benchmarks/batching.py                       # wan-toy-draft, 1 thread
    .venv/bin/python benchmarks/batching.py --variant wan-toy --steps 20
    .venv/bin/python benchmarks/batching.py --tiny                # a smoke run (the tests)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.batch_render import denoise_batch  # noqa: E402
from workers.toy import BUNDLED_DIR  # noqa: E402
from workers.wan_pipeline import RenderRequest, WanT2V  # noqa: E402

SHAPES = ("a red circle", "a yellow square", "a green triangle", "a blue circle")
MOTIONS = ("moving right", "moving left", "moving up", "moving down")


def requests(count: int, frames: int, size: int, steps: int, guidance: float
             ) -> list[RenderRequest]:
    """``count`` like drafts: same size, frames, steps, guidance; own prompt and seed."""
    return [RenderRequest(f"{SHAPES[i % 4]} {MOTIONS[(i // 4) % 4]} on a black background",
                          "", frames=frames, height=size, width=size, steps=steps,
                          guidance_high=guidance, guidance_low=guidance, seed=100 + i)
            for i in range(count)]


def decode(pipe: WanT2V, latents: torch.Tensor) -> np.ndarray:
    return np.concatenate(list(pipe.decode_chunks(latents)))


def solo_loop(pipe: WanT2V, reqs: list[RenderRequest]) -> tuple[float, float, list, list]:
    """-> (denoise seconds, decode seconds, latents, frames), one job after another."""
    started = time.perf_counter()
    latents = [pipe.denoise(r) for r in reqs]
    denoised = time.perf_counter()
    frames = [decode(pipe, x) for x in latents]
    return denoised - started, time.perf_counter() - denoised, latents, frames


def batched_loop(pipe: WanT2V, reqs: list[RenderRequest], size: int
                 ) -> tuple[float, float, list, list]:
    """-> (denoise seconds, decode seconds, latents, frames), ``size`` jobs per batch; the
    decode is per member, as on the farm's actors."""
    latents, denoise_s = [], 0.0
    for first in range(0, len(reqs), size):
        started, states = time.perf_counter(), None
        for *_, states in denoise_batch(pipe, reqs[first:first + size]):
            pass
        denoise_s += time.perf_counter() - started
        latents += [state.latents for state in states]
    started = time.perf_counter()
    frames = [decode(pipe, x) for x in latents]
    return denoise_s, time.perf_counter() - started, latents, frames


def fastest(runs: list[tuple]) -> tuple:
    """The run of least total time: on a shared machine the others lost time to neighbours."""
    return min(runs, key=lambda run: run[0] + run[1])


def max_diffs(a_latents, b_latents, a_frames, b_frames) -> tuple[float, int]:
    latent = max(float((a - b).abs().max()) for a, b in zip(a_latents, b_latents))
    frame = max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
                for a, b in zip(a_frames, b_frames))
    return latent, frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="wan-toy-draft", help="a bundled toy model")
    parser.add_argument("--steps", type=int, default=4, help="the variant's default_steps")
    parser.add_argument("--guidance", type=float, default=1.0, help="CFG scale (1.0: one pass)")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=32, help="pixels, square")
    parser.add_argument("--sizes", default="1,2,4,8", help="batch sizes")
    parser.add_argument("--jobs", type=int, default=16, help="jobs per loop (a multiple of "
                        "every size)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (an actor's "
                        "FARM_ACTOR_CPUS)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pays", type=float, default=0.05, help="least jobs-per-minute gain "
                        "over the size before that still pays")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop per size; "
                        "the fastest counts")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: sizes 1,2, 2 jobs")
    args = parser.parse_args()
    sizes = [1, 2] if args.tiny else [int(s) for s in args.sizes.split(",")]
    jobs = 2 if args.tiny else args.jobs
    args.repeats = 1 if args.tiny else args.repeats
    if any(jobs % s for s in sizes):
        parser.error(f"--jobs {jobs} must be a multiple of every size in {sizes}")
    torch.set_num_threads(args.threads)
    pipe = WanT2V.from_folder(BUNDLED_DIR / args.variant, device=args.device)
    reqs = requests(jobs, args.frames, args.size, args.steps, args.guidance)
    solo_loop(pipe, reqs[:1])  # warm up: first-call costs are no one's
    print(f"{args.variant} {args.size}x{args.size} {args.frames} frames, {args.steps} steps, "
          f"guidance {args.guidance}, {jobs} jobs per loop, {args.threads} thread(s), "
          f"{args.device}")
    print(f"{'batch':>5} {'solo jobs/min':>14} {'batched jobs/min':>17} {'gain':>6} "
          f"{'denoise gain':>13} {'max|d| latents':>15} {'max|d| frames':>14} {'marginal':>9}")
    rows, solo_runs = {}, []
    for size in sizes:  # solo and batched alternate, so drift in the machine's load hits both
        batched_runs = []
        for _ in range(args.repeats):
            solo_runs.append(solo_loop(pipe, reqs))
            batched_runs.append(batched_loop(pipe, reqs, size))
        rows[size] = fastest(batched_runs)
    solo = fastest(solo_runs)
    solo_rate = jobs * 60 / (solo[0] + solo[1])
    rates, best = {}, (0.0, 1, float("nan"))
    for size, (denoise_s, decode_s, latents, frames) in rows.items():
        rate = rates[size] = jobs * 60 / (denoise_s + decode_s)
        latent_d, frame_d = max_diffs(solo[2], latents, solo[3], frames)
        # A batch of ``size`` against ``size`` solo jobs, both render time (denoise + decode).
        ratio = (denoise_s + decode_s) / (solo[0] + solo[1])
        marginal = (ratio * size - 1) / (size - 1) if size > 1 else float("nan")
        if size > 1 and rate / solo_rate > best[0]:
            best = (rate / solo_rate, size, marginal)
        print(f"{size:>5} {solo_rate:>14.1f} {rate:>17.1f} {rate / solo_rate:>6.2f} "
              f"{solo[0] / denoise_s:>13.2f} {latent_d:>15.2e} {frame_d:>11d}/255 "
              f"{marginal:>9.2f}")
    stops = next((s for prev, s in zip(sizes, sizes[1:])
                  if rates[s] < rates[prev] * (1 + args.pays)), None)
    print("stops paying at batch " + (f"{stops} (less than {args.pays:.0%} more jobs per "
                                      f"minute than batch {sizes[sizes.index(stops) - 1]})"
                                      if stops else f"> {sizes[-1]}: still paying"))
    print(f"batch_marginal at the best size ({best[1]}): {best[2]:.2f} (the catalog's "
          "batch_marginal: a batch of n renders in solo * (1 + (n - 1) * marginal))")
    print(f"ratio batched / solo jobs per minute at batch {best[1]}: {best[0]:.2f}")


if __name__ == "__main__":
    main()
