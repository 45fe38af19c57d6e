"""docker-compose.yml is valid compose, and every `farm` command it runs exists in the CLI."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml
from typer.testing import CliRunner

from farm.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


def compose_cli() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    assert shutil.which("docker-compose"), "scripts/system-deps.sh installs docker-compose"
    return ["docker-compose"]


def test_compose_file_is_valid():
    env = dict(os.environ, FARM_FLOWER_PASSWORD="secret")
    result = subprocess.run(compose_cli() + ["-f", str(COMPOSE), "config", "-q"],
                            capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    # Flower's password has no default: compose refuses to start without one.
    env.pop("FARM_FLOWER_PASSWORD")
    refused = subprocess.run(compose_cli() + ["-f", str(COMPOSE), "config", "-q"],
                             capture_output=True, text=True, cwd=ROOT, env=env)
    assert refused.returncode != 0 and "FARM_FLOWER_PASSWORD" in refused.stderr


def farm_invocations() -> list[tuple[str, list[str]]]:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    found = []
    for name, service in services.items():
        command = service.get("command")
        if not command:
            continue
        if command[:2] == ["sh", "-c"]:
            parts = [shlex.split(p) for p in command[2].split("&&")]
        else:
            parts = [command]
        found += [(name, p[1:]) for p in parts if p and p[0] == "farm"]
    return found


def test_every_farm_command_in_compose_exists():
    invocations = farm_invocations()
    services = {name for name, _ in invocations}
    assert {"migrate", "api", "worker-render-cpu", "worker-stitch", "flower",
            "ray-head", "beat"} <= services
    runner = CliRunner()
    for name, args in invocations:
        words = [a for a in args if not a.startswith("-")]
        path = words[:2] if words[:1] in (["db"], ["ray"], ["models"]) else words[:1]
        result = runner.invoke(app, path + ["--help"])
        assert result.exit_code == 0, f"{name}: farm {' '.join(path)}: {result.output}"
        # The options it passes are options of that command.
        help_text = result.output
        for option in (a.split("=")[0] for a in args if a.startswith("--")):
            assert option in help_text, f"{name}: farm {' '.join(path)} has no {option}"
