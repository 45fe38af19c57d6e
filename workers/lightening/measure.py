"""What a variant keeps and what it saves, against its base (issue #12).

For one folder and its render settings (steps, guidance): per-attribute accuracy under the
toy world's judge (workers/toy/evaluate.py: seen and held-out captions, English and
Chinese, Wilson intervals over the seeds), its frames for a fixed set of (caption, seed)
(so PSNR against the base's frames from the same noise), the transformers' bytes on disk,
the process's peak resident memory, and render time end to end and denoising only.
One folder per process (benchmarks/lightening.py runs each in its own), so peak memory
and torch's state are the variant's own.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from workers.toy.evaluate import ATTRIBUTES, EvalSettings, run_eval, wilson
from workers.wan_pipeline import RenderRequest, WanT2V

EXPERTS = ("transformer", "transformer_2")
# (caption, seed) rendered by every variant for PSNR against the base: held-out ones too.
PSNR_CASES = (("a red circle moving right on a black background", 11),
              ("a blue square moving left on a gray background", 12),
              ("a red triangle moving up on a navy background", 13),  # held out of training
              ("棕色背景上一个黄色圆形向下移动", 14))  # held out, in Chinese


@dataclass
class Measured:
    folder: str
    steps: int
    guidance: float
    accuracy: dict  # attribute -> [correct, total]
    held_out: dict  # attribute -> [correct, total], held-out captions only
    transformer_bytes: int
    peak_rss_mb: float
    end_to_end_s: float  # median of renders: prompt encoding, denoising, decoding
    denoise_s: float  # median: the denoising loop only
    frames_file: str  # .npy of the PSNR cases' frames, (cases, T, H, W, 3) uint8
    transformer_tensor_bytes: int = 0  # the experts' tensors alone (files less headers)
    # With ``compiled``: both experts under torch.compile, median denoising seconds and
    # the first call's (compilation included); None when not asked for.
    compiled_denoise_s: float | None = None
    compile_first_s: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def transformer_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for name in EXPERTS if (Path(folder) / name).is_dir()
               for p in (Path(folder) / name).iterdir() if p.suffix in (".safetensors", ".bin"))


def transformer_tensor_bytes(folder: Path) -> int:
    """Bytes of the experts' tensors (int8 data, scales, fp32 norms...), without the
    safetensors headers (a JSON index of every tensor: ~20 KB per toy expert). A
    safetensors file is an 8-byte little-endian header length, the header, then the data."""
    total = 0
    for name in EXPERTS:
        for path in sorted((Path(folder) / name).glob("*.safetensors")):
            with path.open("rb") as fh:
                header = int.from_bytes(fh.read(8), "little")
            total += path.stat().st_size - 8 - header
    return total


def _compiled_denoise(pipe: WanT2V, steps: int, guidance: float, repeats: int
                      ) -> tuple[float, float]:
    """(median denoising seconds, first call's seconds) with both experts compiled."""
    for name in ("transformer", "transformer_2"):
        setattr(pipe, name, torch.compile(getattr(pipe, name)))
    req = _request(PSNR_CASES[0][0], 100, steps, guidance)
    started = time.perf_counter()
    pipe.denoise(req)
    first = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        pipe.denoise(req)
        times.append(time.perf_counter() - started)
    return statistics.median(times), first


def _request(caption: str, seed: int, steps: int, guidance: float) -> RenderRequest:
    return RenderRequest(caption, "", 17, 32, 32, steps, guidance, guidance, seed)


def _timed(pipe: WanT2V, steps: int, guidance: float, repeats: int) -> tuple[float, float]:
    """Median seconds (end to end, denoising only) over ``repeats`` renders."""
    whole, denoise = [], []
    for i in range(repeats):
        req = _request(PSNR_CASES[i % len(PSNR_CASES)][0], 100 + i, steps, guidance)
        started = time.perf_counter()
        latents = pipe.denoise(req)
        denoised = time.perf_counter()
        np.concatenate(list(pipe.decode_chunks(latents)))
        whole.append(time.perf_counter() - started)
        denoise.append(denoised - started)
    return statistics.median(whole), statistics.median(denoise)


def measure(folder: Path, steps: int, guidance: float, frames_file: Path,
            quantize: str | None = None, repeats: int = 9,
            eval_settings: EvalSettings | None = None, compiled: bool = False) -> Measured:
    torch.set_num_threads(1)
    pipe = WanT2V.from_folder(folder, quantize=quantize) if quantize else \
        WanT2V.from_folder(folder)
    cases = np.stack([np.concatenate(list(pipe.decode_chunks(pipe.denoise(
        _request(c, s, steps, guidance))))) for c, s in PSNR_CASES])
    np.save(frames_file, cases)
    _timed(pipe, steps, guidance, 1)  # warm up
    end_to_end, denoise = _timed(pipe, steps, guidance, repeats)
    cfg = eval_settings or EvalSettings(steps=steps, guidance=guidance)
    samples = run_eval(pipe, cfg)
    accuracy = {a: [sum(s.correct(a) for s in samples), len(samples)] for a in ATTRIBUTES}
    held = [s for s in samples if s.split == "held-out"]
    held_out = {a: [sum(s.correct(a) for s in held), len(held)] for a in ATTRIBUTES}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    measured = Measured(str(folder), steps, guidance, accuracy, held_out,
                        transformer_bytes(folder), round(peak, 1), end_to_end, denoise,
                        str(frames_file), transformer_tensor_bytes(folder))
    if compiled:  # last: compiled experts change nothing measured above
        measured.compiled_denoise_s, measured.compile_first_s = _compiled_denoise(
            pipe, steps, guidance, max(3, repeats // 3))
    return measured


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 videos, dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def retention(variant: dict, base: dict) -> dict:
    """attribute -> variant accuracy / base accuracy."""
    return {a: (variant[a][0] / variant[a][1]) / max(1e-9, base[a][0] / base[a][1])
            for a in ATTRIBUTES}


def interval(counts: list[int]) -> tuple[float, float]:
    return wilson(counts[0], counts[1])
