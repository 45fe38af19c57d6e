"""`farm models list`, `make-tiny --like` and `derive` through the command line."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from farm.policy import CONFIG_DIR
from tests.e2e.test_cli import farm

RULES = CONFIG_DIR / "rules.yaml"

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
    assert set(before) == {"wan-tiny", "wan-toy", "wan2.2-ti2v-5b", "wan2.2-t2v-a14b",
                           "wan-toy-int8", "wan-toy-pruned", "wan-toy-4step", "wan-toy-draft",
                           "wan2.2-t2v-a14b-int8", "wan2.2-ti2v-5b-int8"}
    for shipped in ("wan-toy-int8", "wan-toy-pruned", "wan-toy-4step", "wan-toy-draft"):
        state, size, where = before[shipped]  # derived, and shipped beside the toy
        assert state == "present" and where.endswith(shipped)
        assert float(size.split()[0]) <= 20 and size.endswith("MB")
    assert before["wan2.2-t2v-a14b-int8"][2].endswith("quantized int8-weight at load time)")
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


def test_derive_writes_a_variant_registers_it_and_the_rules_reach_it(tmp_path):
    """`farm models derive` (issue #12): the quantized folder and its manifest, the entry in
    the user's variants file (its track on wan-toy overriding the shipped one), and `farm
    models list` / `farm rules check` reading it."""
    from workers.lightening.manifest import weights_sha256
    from workers.toy import BUNDLED_DIR

    env = dict(os.environ, FARM_VARIANTS_FILE=str(tmp_path / "variants.yaml"),
               FARM_MODELS_DIR=str(tmp_path))
    out = tmp_path / "toy-q"
    made = farm("models", "derive", "wan-toy", str(out), "--quantize", "int8-weight",
                "--name", "toy-q", "--for-track", "draft", env=env)
    assert made.returncode == 0, made.stderr
    manifest = json.loads((out / "derive.json").read_text())
    assert manifest["base"]["sha256"] == weights_sha256(BUNDLED_DIR / "wan-toy")
    assert manifest["sha256"] == weights_sha256(out) != manifest["base"]["sha256"]
    assert [op["operation"] for op in manifest["operations"]] == ["quantize"]
    doc = yaml.safe_load((tmp_path / "variants.yaml").read_text())
    entry = doc["models"]["toy-q"]
    assert entry["derived_from"] == "wan-toy" and entry["folder"] == str(out)
    assert 1.0 < entry["bytes_per_param"] < 1.5  # int8 data, fp32 scales and norms
    assert doc["models"]["wan-toy"] == {"tracks": {"draft": "toy-q"}}
    listed = rows(farm("models", "list", env=env).stdout)
    assert listed["toy-q"][0] == "present" and listed["toy-q"][2] == str(out)
    check = farm("rules", "check", str(RULES), env=env)
    assert check.returncode == 0, check.stderr
    assert "wan-toy draft track: toy-q on cpu x1" in check.stdout
    assert f"toy-q: present at {out}" in check.stdout

    on_load = farm("models", "derive", "wan-toy", str(tmp_path / "toy-ol"), "--quantize",
                   "int8-dynamic", "--on-load", env=env)
    assert on_load.returncode == 0, on_load.stderr
    entry = yaml.safe_load((tmp_path / "variants.yaml").read_text())["models"]["toy-ol"]
    assert entry["quantize_on_load"] == "int8-dynamic" and entry["bytes_per_param"] == 1.0
    assert entry["folder"] == str(BUNDLED_DIR / "wan-toy")  # the base's weights, not copied
    assert not (tmp_path / "toy-ol" / "transformer").exists()


@pytest.mark.parametrize("args, named", [
    (["--quantize", "int4"], "--quantize 'int4'"),
    (["--prune-ffn", "1.5"], "--prune-ffn 1.5"),
    (["--prune-heads", "0.25"], "--prune-heads 0.25"),
    (["--distill-steps", "0"], "got 0"),
    (["--quantize", "int8-weight", "--prune-ffn", "0.2", "--on-load"], "--on-load"),
])
def test_derive_refuses_bad_options_naming_them_and_writes_nothing(tmp_path, args, named):
    env = dict(os.environ, FARM_VARIANTS_FILE=str(tmp_path / "variants.yaml"))
    refused = farm("models", "derive", "wan-toy", str(tmp_path / "out"), *args, env=env)
    assert refused.returncode == 2 and named in refused.stderr, refused.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "variants.yaml").exists()


def test_derive_refuses_a_name_or_track_that_would_break_the_catalog(tmp_path):
    """A base variant's name would make the overlay unloadable (it may only add tracks to
    models.yaml's variants): refused before any work, and the variants file stays as it was."""
    env = dict(os.environ, FARM_VARIANTS_FILE=str(tmp_path / "variants.yaml"))
    (tmp_path / "variants.yaml").write_text("models: {}\n")
    for args, named in ((["--name", "wan-toy"], "--name"), (["--name", "wan-tiny"], "--name"),
                        (["--for-track", "drafts"], "--for-track")):
        refused = farm("models", "derive", "wan-toy", str(tmp_path / "out"), "--quantize",
                       "int8-weight", *args, env=env)
        assert refused.returncode == 2 and named in refused.stderr, refused.stderr
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "variants.yaml").read_text() == "models: {}\n"
    missing = farm("models", "derive", "wan-toy", str(tmp_path / "out"), "--distill-steps", "4",
                   "--prompts", str(tmp_path / "nope.txt"), env=env)
    assert missing.returncode == 2 and "--prompts" in missing.stderr
    quantized = farm("models", "derive", "wan-toy-int8", str(tmp_path / "out"), "--quantize",
                     "int8-weight", "--on-load", env=env)
    assert quantized.returncode == 2 and "--on-load: wan-toy-int8 is already quantized" in \
        quantized.stderr, quantized.stderr
    # fp8 at load is checked by the workers' GPUs, not this machine's.
    fp8 = farm("models", "derive", "wan-toy", str(tmp_path / "toy-fp8"), "--quantize", "fp8",
               "--on-load", env=env)
    assert fp8.returncode == 0, fp8.stderr
    entry = yaml.safe_load((tmp_path / "variants.yaml").read_text())["models"]["toy-fp8"]
    assert entry["quantize_on_load"] == "fp8"


def test_eval_renders_a_variant_as_its_jobs_do():
    """`farm eval --model` takes the variant's steps and guidance (a 4-step student at 20
    steps with CFG 4 would be judged on renders no job makes)."""
    out = farm("eval", "--model", "wan-toy-draft", "--seeds", "1", "--combos", "1")
    assert out.returncode == 0, out.stderr
    assert "wan-toy-draft" in out.stdout and "steps=4" in out.stdout
    assert "guidance=1.0" in out.stdout
