"""`farm render` of a 2-second toy clip at 1280x720, cold (new process: Ray start, model load),
against stock diffusers on the same folder in this process (WanPipeline + our encoder).

The farm's figure includes what a user waits for from the shell: Python start-up, SQLite,
an in-process Ray, the actor loading and warming up the model, 20 denoising steps with CFG,
chunked decode, H.264 encode at 1280x720, stitch and ffprobe. Issue #3's target: < 15 s.

    .venv/bin/python benchmarks/toy_render.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.toy import BUNDLED_DIR  # noqa: E402
from workers.video import concat, encode_chunk, probe  # noqa: E402

PROMPT = "a yellow square moving right on a navy background"
FRAMES, FPS = 17, 8  # 2 seconds


def farm_render(out: Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env["FARM_HOME"] = str(out.parent / "home")
    env["FARM_RAY_TEMP_DIR"] = f"/tmp/rfb-{os.getpid()}"
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "farm"), "render", PROMPT, "-o", str(out),
                    "--model", "wan-toy", "--frames", str(FRAMES), "--fps", str(FPS),
                    "--seed", "1"], check=True, env=env, capture_output=True)
    return time.perf_counter() - started


def stock_diffusers(out: Path) -> float:
    from diffusers import WanPipeline

    started = time.perf_counter()
    pipe = WanPipeline.from_pretrained(BUNDLED_DIR / "wan-toy", torch_dtype=torch.float32)
    video = pipe(PROMPT, negative_prompt="", height=32, width=32, num_frames=FRAMES,
                 num_inference_steps=20, guidance_scale=4.0, guidance_scale_2=4.0,
                 generator=torch.Generator().manual_seed(1), output_type="np",
                 max_sequence_length=32).frames[0]
    frames = (np.clip(video, 0, 1) * 255).round().astype(np.uint8)
    chunk = encode_chunk(frames, out.with_suffix(".chunk.mp4"), 1280, 720, FPS)
    concat([chunk], out)
    return time.perf_counter() - started


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        farm_s = farm_render(tmp / "farm.mp4")
        stock_s = stock_diffusers(tmp / "stock.mp4")
        for name, path, seconds in (("farm render (cold process)", tmp / "farm.mp4", farm_s),
                                    ("stock diffusers (warm process)", tmp / "stock.mp4", stock_s)):
            info = probe(path)
            print(f"{name:32s} {seconds:6.2f} s  {info.width}x{info.height} {info.frames} frames")
    print(f"target < 15 s: {'met' if farm_s < 15 else 'MISSED'}")
    print(f"ratio farm / stock diffusers: {farm_s / stock_s:.2f}")


if __name__ == "__main__":
    main()
