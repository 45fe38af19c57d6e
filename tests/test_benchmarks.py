"""The benchmark scripts still run (tiny shapes): a GPU session must not be spent on a crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_gpu_step_runs_at_a_tiny_shape():
    out = run("gpu_step.py", "--tiny", "--no-compile", "--repeats", "1")
    assert "bf16 vs fp32 relative error" in out
    assert out.strip().splitlines()[-1].startswith("stock eager / ours eager default")
