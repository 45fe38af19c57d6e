"""`farm rules check` and `farm rules explain`, run as a user runs them."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from farm.cli.main import app
from farm.policy import CONFIG_DIR

runner = CliRunner()


def test_check_passes_the_shipped_rules_and_lists_them():
    result = runner.invoke(app, ["rules", "check", str(CONFIG_DIR / "rules.yaml")])
    assert result.exit_code == 0, result.output
    assert "6 rules OK" in result.output and "finals: wan2.2-t2v-a14b on a100 x2" in result.output


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
    assert "rule 'too-big': route: wan2.2-t2v-a14b at degree 1" in result.output
    assert "63.8 GB over" in result.output
    assert "rule 'odd': route: degree 3 does not divide" in result.output


def test_explain_a_job_file_with_a_long_queue(tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"track": "final", "frames": 81}))
    result = runner.invoke(app, ["rules", "explain", str(job),
                                 "--rules", str(CONFIG_DIR / "rules.yaml"),
                                 "--queue", "render.a100=12"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "drafts" not in result.output  # first match wins: later rules are not consulted
    assert any(line.startswith("MATCH finals") for line in lines)
    assert "fallback 0: taken: queue render.a100 has 12 jobs waiting (> 8)" in result.output
    assert '"variant": "wan2.2-t2v-a14b-int8"' in result.output
    assert "weights 3.5 + encoders 11.6" in result.output
