"""The farm's VAE decode with workers/cpu_kernels.py against diffusers' stock kernels, in one
process, on one torch thread, for the shipped toy's VAE (wan-toy) and the draft's
half-width decoder (wan-toy-draft); stock and fast decodes alternate.

Sizes: 17 frames at 32x32 (what benchmarks/lightening.py renders) and at 320x192. At
1280x720 torch already takes oneDNN for these convolutions and only the norm changes: one
decode took 125 s swapped and 120 s stock on one thread here, too slow to repeat in this
script. Both decoders get the same latents; the frames must be equal to within one uint8
level. Prints, per decoder and size, the median seconds of each and their ratio; the
last line is the ratio for wan-toy at 32x32 (fast / stock).

    .venv/bin/python benchmarks/vae_decode.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers import AutoencoderKLWan  # noqa: E402

from workers.cpu_kernels import use_fast_cpu_kernels  # noqa: E402
from workers.toy import BUNDLED_DIR  # noqa: E402
from workers.wan_pipeline import _to_uint8, decoded_frames  # noqa: E402

SIZES = ((17, 32, 32), (17, 192, 320))  # frames, height, width


def decode(vae: AutoencoderKLWan, z: torch.Tensor) -> np.ndarray:
    """(T, H, W, 3) uint8, as WanT2V.decode_chunks makes them (one chunk)."""
    with torch.no_grad():
        return _to_uint8(torch.cat(list(decoded_frames(vae, z)), dim=2), vae.config.patch_size)


def median_s(vaes, z, repeats: int) -> list[float]:
    """Median seconds of each VAE's decode, their runs alternating (the machine's drift
    falls on both)."""
    times = [[] for _ in vaes]
    for _ in range(repeats):
        for vae, taken in zip(vaes, times):
            started = time.perf_counter()
            decode(vae, z)
            taken.append(time.perf_counter() - started)
    return [statistics.median(taken) for taken in times]


def compare(variant: str, frames: int, height: int, width: int, repeats: int) -> float:
    folder = BUNDLED_DIR / variant / "vae"
    stock = AutoencoderKLWan.from_pretrained(folder).eval().requires_grad_(False)
    fast = AutoencoderKLWan.from_pretrained(folder).eval().requires_grad_(False)
    swapped = use_fast_cpu_kernels(fast)
    cfg = stock.config
    stride = cfg.scale_factor_spatial
    z = torch.randn(1, cfg.z_dim, (frames - 1) // cfg.scale_factor_temporal + 1,
                    height // stride, width // stride, generator=torch.Generator().manual_seed(0))
    diff = int(np.abs(decode(stock, z).astype(np.int16) - decode(fast, z)).max())
    if diff > 1:
        raise SystemExit(f"{variant} {width}x{height}: frames differ by {diff} levels")
    reps = repeats if height <= 64 else max(1, repeats // 3)  # 2.5-12 s a decode
    stock_s, fast_s = median_s((stock, fast), z, reps)
    print(f"| {variant} | {frames}x{width}x{height} | {swapped} | {stock_s:.3f} | "
          f"{fast_s:.3f} | {fast_s / stock_s:.2f} | {diff} |", flush=True)
    return fast_s / stock_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| decoder | frames x W x H | modules swapped | stock s | fast s | fast/stock | "
          "max uint8 diff |")
    print("|---|---|---|---|---|---|---|")
    ratios = {}
    for variant in ("wan-toy", "wan-toy-draft"):
        for frames, height, width in SIZES:
            ratios[variant, height] = compare(variant, frames, height, width, args.repeats)
    print(f"wan-toy decode at 32x32, fast/stock: {ratios['wan-toy', 32]:.2f}")


if __name__ == "__main__":
    main()
