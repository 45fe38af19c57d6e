"""The toy model's derived variants against their base, in one run (issue #12).

    .venv/bin/python benchmarks/lightening.py             # every shipped variant, ~8 minutes
    .venv/bin/python benchmarks/lightening.py --variants wan-toy-int8 wan-toy-draft
    .venv/bin/python benchmarks/lightening.py --write-manifests  # rows into each derive.json

Each variant (and the base, wan-toy) is measured in its own process on one torch thread
(workers/lightening/measure.py): per-attribute accuracy under the toy world's judge with
95% Wilson intervals (seen and held-out captions, English and Chinese, 2 seeds each), its
retention (variant / base), PSNR of its frames against the base's from the same noise,
transformer bytes on disk, peak resident memory of the process, and median render time end
to end and denoising only; the base and the int8 variant are also timed with both experts
under torch.compile (compiled against compiled: eager int8 pays a dequantization per
Linear that compiling fuses). Each renders with its catalog settings (a 4-step student: 4
steps, guidance 1.0). Ratios are measured on a model of about a million parameters per
expert at 32x32: they are not predictions for Wan2.2-T2V-A14B. The last line is the draft
variant's end-to-end time over the base's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# variant -> (what it is, targets: min retention, max denoise ratio, max end-to-end ratio,
# max transformer bytes ratio), issue #12's.
TARGETS = {
    "wan-toy-int8": ("int8 weights", 0.95, None, None, 0.30),
    "wan-toy-pruned": ("structured prune: 2 of 4 blocks high, 1 low, recovered", 0.90, 0.80,
                       None, None),
    "wan-toy-4step": ("4-step student", 0.90, 0.20, 0.35, None),
    "wan-toy-draft": ("draft: 4-step student, half-width decoder, int8", 0.85, None, 0.30,
                      None),
}
BASE = "wan-toy"
COMPILED = (BASE, "wan-toy-int8")  # timed compiled as well


def measure_one(name: str, out: Path, compiled: bool) -> dict:
    """In this process: measure one catalog variant, write its figures as JSON."""
    from farm.model_dirs import resolve_model_dir
    from farm.policy import load_policy
    from farm.settings import Settings
    from workers.lightening.measure import measure

    variant = load_policy().catalog.model(name)
    folder = resolve_model_dir(Settings(), variant)
    measured = measure(folder, variant.default_steps, variant.guidance.high,
                       out.with_suffix(".npy"), variant.quantize_on_load, compiled=compiled)
    out.write_text(json.dumps(measured.as_dict()))
    return measured.as_dict()


def in_child(name: str, work: Path) -> dict:
    out = work / f"{name}.json"
    subprocess.run([sys.executable, __file__, "--one", name, "--json", str(out)]
                   + (["--compiled"] if name in COMPILED else []), check=True, cwd=ROOT)
    return json.loads(out.read_text())


def _acc(counts) -> str:
    from workers.lightening.measure import interval

    lo, hi = interval(counts)
    return f"{counts[0] / counts[1]:.0%} [{lo:.0%}-{hi:.0%}]"


def ratios(m: dict, base: dict) -> dict:
    """One variant's figures against the base's (what derive.json records as measured)."""
    import numpy as np

    from workers.lightening.measure import psnr, retention

    out = {"retention": retention(m["accuracy"], base["accuracy"]),
           "held_out_retention": retention(m["held_out"], base["held_out"]),
           "accuracy": m["accuracy"], "held_out": m["held_out"],
           "transformer_file_x": m["transformer_bytes"] / base["transformer_bytes"],
           "transformer_tensor_x": m["transformer_tensor_bytes"]
           / base["transformer_tensor_bytes"],
           "denoise_x": m["denoise_s"] / base["denoise_s"],
           "end_to_end_x": m["end_to_end_s"] / base["end_to_end_s"],
           "psnr_vs_base_db": psnr(np.load(m["frames_file"]), np.load(base["frames_file"])),
           "peak_rss_mb": m["peak_rss_mb"], "steps": m["steps"], "guidance": m["guidance"]}
    if m.get("compiled_denoise_s") and base.get("compiled_denoise_s"):
        out["compiled_denoise_x"] = m["compiled_denoise_s"] / base["compiled_denoise_s"]
    return out


def report(base: dict, rows: dict[str, dict]) -> list[str]:
    """The table and the verdict per target; returns the lines printed."""
    import numpy as np

    from workers.lightening.measure import psnr, retention

    base_frames = np.load(base["frames_file"])
    lines = ["| variant | steps | transformer tensor MB (x base) | peak RSS MB | denoise s (x base) "
             "| end-to-end s (x base) | PSNR vs base dB | colour | shape | motion "
             "| retention c/s/m | held-out retention c/s/m |", "|" + "---|" * 12]
    verdicts = []
    for name, m in [(BASE, base), *rows.items()]:
        keep = retention(m["accuracy"], base["accuracy"])
        keep_held = retention(m["held_out"], base["held_out"])
        size = m["transformer_tensor_bytes"] / base["transformer_tensor_bytes"]
        file_size = m["transformer_bytes"] / base["transformer_bytes"]
        den, e2e = m["denoise_s"] / base["denoise_s"], m["end_to_end_s"] / base["end_to_end_s"]
        db = psnr(np.load(m["frames_file"]), base_frames)
        lines.append(
            f"| {name} | {m['steps']} | {m['transformer_tensor_bytes'] / 1e6:.2f} ({size:.2f}x; "
            f"file {file_size:.2f}x) | "
            f"{m['peak_rss_mb']:.0f} | {m['denoise_s']:.3f} ({den:.2f}x) | "
            f"{m['end_to_end_s']:.3f} ({e2e:.2f}x) | {db:.1f} | "
            + " | ".join(_acc(m["accuracy"][a]) for a in ("colour", "shape", "motion"))
            + f" | {'/'.join(f'{keep[a]:.0%}' for a in keep)}"
            f" | {'/'.join(f'{keep_held[a]:.0%}' for a in keep_held)} |")
        if name in TARGETS:
            what, min_keep, max_den, max_e2e, max_size = TARGETS[name]
            checks = [(f"retention >= {min_keep:.0%} on every attribute",
                       min(keep.values()) >= min_keep, f"{min(keep.values()):.0%}")]
            if max_den is not None:
                checks.append((f"denoising <= {max_den}x", den <= max_den, f"{den:.2f}x"))
            if max_e2e is not None:
                checks.append((f"end-to-end <= {max_e2e}x", e2e <= max_e2e, f"{e2e:.2f}x"))
            if max_size is not None:
                checks.append((f"transformer weights <= {max_size}x", size <= max_size,
                               f"{size:.3f}x (files {file_size:.3f}x)"))
            for target, ok, got in checks:
                verdicts.append(f"{name} ({what}): {target}: {got} "
                                f"{'met' if ok else 'MISSED'}")
    compiled = [f"{n}: {m['compiled_denoise_s']:.3f} s denoising compiled (eager "
                f"{m['denoise_s']:.3f} s; first call {m['compile_first_s']:.0f} s)"
                for n, m in [(BASE, base), *rows.items()] if m.get("compiled_denoise_s")]
    if len(compiled) == 2 and "wan-toy-int8" in rows:
        x = rows["wan-toy-int8"]["compiled_denoise_s"] / base["compiled_denoise_s"]
        compiled.append(f"int8 compiled / base compiled, denoising: {x:.2f}x")
    decode = base["end_to_end_s"] - base["denoise_s"]
    floor = [f"decoding (the VAE every variant keeps): {decode:.3f} s, "
             f"{decode / base['end_to_end_s']:.2f} of the base's end to end: no variant with "
             f"this VAE renders in less than {decode / base['end_to_end_s']:.2f}x"]
    return lines + [""] + compiled + floor + [""] + verdicts


def write_measured(folder: Path, measured: dict) -> None:
    """Put the measured row into the variant's derive.json (its manifest)."""
    manifest_file = folder / "derive.json"
    if not manifest_file.is_file():
        return
    manifest = json.loads(manifest_file.read_text())
    manifest["measured"] = {"against": BASE, "by": "benchmarks/lightening.py", **{
        k: (round(v, 4) if isinstance(v, float) else
            {a: round(x, 4) for a, x in v.items()} if k.endswith("retention") else v)
        for k, v in measured.items()}}
    manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=list(TARGETS))
    parser.add_argument("--write-manifests", action="store_true",
                        help="record each variant's row in its folder's derive.json")
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        measure_one(args.one, args.json, args.compiled)
        return
    work = Path(tempfile.mkdtemp(prefix="lightening-"))
    base = in_child(BASE, work)
    rows = {name: in_child(name, work) for name in args.variants}
    for line in report(base, rows):
        print(line)
    if args.write_manifests:
        for name, m in rows.items():
            write_measured(Path(m["folder"]), ratios(m, base))
    print("(ratios on the toy model, ~1M parameters per expert at 32x32: not predictions "
          "for A14B)")
    if "wan-toy-draft" in rows:
        ratio = rows["wan-toy-draft"]["end_to_end_s"] / base["end_to_end_s"]
        print(f"draft end-to-end / base end-to-end: {ratio:.2f}")


if __name__ == "__main__":
    main()
