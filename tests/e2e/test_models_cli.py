"""`farm models list` and `farm models make-tiny --like` through the command line."""

from __future__ import annotations

import json
import os

import pytest

from tests.e2e.test_cli import farm

pytestmark = pytest.mark.e2e


def rows(output: str) -> dict[str, list[str]]:
    """variant -> [state, size, where/how] from the table."""
    lines = output.splitlines()
    assert lines[0].split()[:3] == ["VARIANT", "STATE", "SIZE"]
    out = {}
    for line in lines[1:]:
        name, state, rest = line.split(None, 2)
        size, where = (rest.split(None, 1) if state == "missing"
                       else (" ".join(rest.split()[:2]), rest.split(None, 2)[2]))
        out[name] = [state, size, where]
    return out


def test_list_shows_present_and_missing_variants_and_how_to_make_them(tmp_path):
    env = dict(os.environ, FARM_MODELS_DIR=str(tmp_path))
    listed = farm("models", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    before = rows(listed.stdout)
    assert set(before) == {"wan-tiny", "wan-toy", "wan2.2-ti2v-5b", "wan2.2-t2v-a14b"}
    assert before["wan-tiny"] == ["missing", "-", f"run `farm models make-tiny "
                                  f"{tmp_path / 'wan-tiny'} --like t2v-a14b`"]
    assert before["wan2.2-t2v-a14b"][0] == "missing"
    assert before["wan2.2-t2v-a14b"][2] == (
        "download https://huggingface.co/Wan-AI/Wan2.2-T2V-A14B-Diffusers and put the folder "
        f"at {tmp_path}/Wan2.2-T2V-A14B-Diffusers")
    state, size, where = before["wan-toy"]  # ships with the project
    assert state == "present" and size.endswith("MB") and where.endswith("wan-toy")

    made = farm("models", "make-tiny", str(tmp_path / "wan-tiny"), env=env)
    assert made.returncode == 0, made.stderr
    after = rows(farm("models", "list", env=env).stdout)
    state, size, where = after["wan-tiny"]
    on_disk = sum(p.stat().st_size for p in (tmp_path / "wan-tiny").rglob("*") if p.is_file())
    assert state == "present" and where == str(tmp_path / "wan-tiny")
    assert size == f"{on_disk / 1024:.1f} KB" or size == f"{on_disk / 2**20:.1f} MB"


def test_make_tiny_like_the_5b_and_a_bad_layout(tmp_path):
    made = farm("models", "make-tiny", str(tmp_path / "5b"), "--like", "ti2v-5b")
    assert made.returncode == 0, made.stderr
    index = json.loads((tmp_path / "5b" / "model_index.json").read_text())
    assert index["expand_timesteps"] is True and index["transformer_2"] == [None, None]
    bad = farm("models", "make-tiny", str(tmp_path / "x"), "--like", "sdxl")
    assert bad.returncode != 0 and "--like" in bad.stderr and "'sdxl'" in bad.stderr
    assert not (tmp_path / "x").exists()
