"""`farm rules check` and `farm rules explain`, run as a user runs them."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from farm.cli.main import app
from farm.policy import CONFIG_DIR
from farm.settings import get_settings

runner = CliRunner()


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """An empty FARM_MODELS_DIR for one test (settings are read again, then restored)."""
    monkeypatch.setenv("FARM_MODELS_DIR", str(tmp_path / "models"))
    get_settings.cache_clear()
    yield get_settings().models_dir
    monkeypatch.undo()
    get_settings.cache_clear()


def test_check_passes_the_shipped_rules_and_lists_them(models_dir):
    result = runner.invoke(app, ["rules", "check", str(CONFIG_DIR / "rules.yaml")])
    assert result.exit_code == 0, result.output
    assert "6 rules OK" in result.output
    # Each route with the plan routing picks and its memory, from the one memory model.
    assert ("  finals: wan2.2-t2v-a14b on a100 x2, sp2 (resident): 78.4 of 80 GB per GPU\n"
            "    fallback 0: wan2.2-ti2v-5b on a10 x1, single (resident): 22.9 of 24 GB per GPU"
            "; wan2.2-ti2v-5b draft track: wan2.2-ti2v-5b-int8 on a10 x1, single (resident): "
            "17.9 of 24 GB per GPU\n" in result.output)
    # Every variant the rules reach is here or can be made; the output says how.
    assert (f"  wan-tiny: missing at {models_dir / 'wan-tiny'}: run `farm models make-tiny "
            f"{models_dir / 'wan-tiny'} --like t2v-a14b`") in result.output
    assert "  wan-toy: present at " in result.output
    assert ("wan2.2-t2v-a14b: missing at " f"{models_dir / 'Wan2.2-T2V-A14B-Diffusers'}: "
            "download https://huggingface.co/Wan-AI/Wan2.2-T2V-A14B-Diffusers") in result.output
    # The 5B's draft track (scheduler/config/variants.yaml, issue #12) is its own folder,
    # quantized at load; nothing routes to the int8 A14B.
    assert (f"  wan2.2-ti2v-5b-int8: missing at {models_dir / 'Wan2.2-TI2V-5B-Diffusers'}: "
            "download https://huggingface.co/Wan-AI/Wan2.2-TI2V-5B-Diffusers") in result.output
    assert "quantized int8-weight at load time" in result.output
    assert "wan2.2-t2v-a14b-int8" not in result.output


def test_check_flags_a_variant_nothing_makes(tmp_path, models_dir):
    """A route (or fallback) to a variant with no folder and no way to make one fails."""
    models = tmp_path / "models.yaml"
    custom = (CONFIG_DIR / "models.yaml").read_text() + """  wan-custom:  # a local fine-tune
    folder: Wan-Custom
    native: 32x32
    max_frames: 17
    default_steps: 20
    guidance: {high: 4.0, low: 4.0}
    params_b: 0.001
    experts: 2
    bytes_per_param: 4
    dim: 128
    ffn_dim: 256
    layers: 4
    latent: {channels: 8, stride: [4, 4, 4], patch: [1, 2, 2]}
    heads: 4
    degrees: [1]
    extra_gb: 0.02
    activation_gb: {32x32: 0.05}
    seconds_per_step: {cpu: 0.1}
"""
    models.write_text(custom)
    rules = tmp_path / "rules.yaml"
    rules.write_text("""rules:
  - name: customs
    match: {project: studio}
    route: {variant: wan-toy, tier: cpu}
    fallbacks:
      - when: {queue_longer_than: 3}
        route: {variant: wan-custom, tier: cpu}
  - name: rest
    route: {variant: wan-toy, tier: cpu}
""")
    result = runner.invoke(app, ["rules", "check", str(rules), "--models", str(models)])
    assert result.exit_code == 1, result.output
    where = models_dir / "Wan-Custom"
    assert f"  wan-custom: missing at {where}, and nothing makes it" in result.output
    assert (f"error: {rules}: rule 'customs': fallbacks[0]: variant 'wan-custom' has no "
            f"folder at {where} and nothing makes one: put its diffusers folder there"
            in result.output)
    # Once the folder is there, the same rules pass.
    where.mkdir(parents=True)
    (where / "model_index.json").write_text("{}")
    again = runner.invoke(app, ["rules", "check", str(rules), "--models", str(models)])
    assert again.exit_code == 0, again.output
    assert f"  wan-custom: present at {where}" in again.output


def test_check_names_every_bad_rule(tmp_path):
    bad = tmp_path / "rules.yaml"
    bad.write_text("""rules:
  - name: too-big
    match: {track: final}
    route: {variant: wan2.2-t2v-a14b, tier: a10, degree: 1}
  - name: odd
    match: {track: draft}
    route: {variant: wan2.2-t2v-a14b, tier: a100, degree: 3}
""")
    result = runner.invoke(app, ["rules", "check", str(bad)])
    assert result.exit_code == 1
    assert "rule 'too-big': route: wan2.2-t2v-a14b single (resident" in result.output
    assert "63.8 GB over" in result.output
    assert "rule 'odd': route: degree 3 does not divide" in result.output


def test_explain_a_job_file_with_a_deadline_and_a_long_queue(tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"track": "final", "frames": 81, "deadline_s": 600}))
    result = runner.invoke(app, ["rules", "explain", str(job),
                                 "--rules", str(CONFIG_DIR / "rules.yaml"),
                                 "--queue", "render.a100=12"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "drafts" not in result.output  # first match wins: later rules are not consulted
    assert any(line.startswith("MATCH finals") for line in lines)
    assert ("fallback 0: taken: deadline 600s cannot be met on a100: about 0s of queue + "
            "1609s render") in result.output
    assert '"variant": "wan2.2-ti2v-5b"' in result.output
    assert ("memory: wan2.2-ti2v-5b single (resident, 1280x704 x 121 frames): weights 10.0 + "
            "encoders 1.4 + activations 10.0 + overhead 1.5 = 22.9 GB per GPU; tier a10 has "
            "24 GB") in result.output
