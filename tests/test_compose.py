"""docker-compose.yml is valid compose, every `farm` command it runs exists in the CLI, and
each render node can hold the actor groups its tier's routes need."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml
from typer.testing import CliRunner

from farm.cli.main import app
from farm.cli.services import DRIVERS_PER_SLOT

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


def compose_cli() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    assert shutil.which("docker-compose"), "scripts/system-deps.sh installs docker-compose"
    return ["docker-compose"]


def _config(env_file: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FARM_ENV_FILE=env_file)
    return subprocess.run(compose_cli() + ["-f", str(COMPOSE), "config", "-q"],
                          capture_output=True, text=True, cwd=ROOT, env=env)


def test_compose_file_is_valid():
    result = _config("deploy/farm.env.example")
    assert result.returncode == 0, result.stderr
    # Secrets come from the env file only: compose refuses to start without one.
    refused = _config("deploy/no-such.env")
    assert refused.returncode != 0 and "no-such.env" in refused.stderr


def test_secrets_come_from_the_env_file_and_services_restart_and_report_health():
    """Issue #14: no secret in the compose file, every long-running service restarts and has
    a healthcheck, and Redis keeps its queues across restarts (AOF on a volume)."""
    compose = yaml.safe_load(COMPOSE.read_text())
    example = dict(line.split("=", 1) for line in
                   (ROOT / "deploy" / "farm.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert {"POSTGRES_PASSWORD", "FARM_DATABASE_URL", "FARM_FLOWER_PASSWORD",
            "FARM_METRICS_TOKEN"} <= set(example)
    assert example["POSTGRES_PASSWORD"] in example["FARM_DATABASE_URL"]
    for name, service in compose["services"].items():
        environment = service.get("environment") or {}
        assert not set(example) & set(environment), (name, set(example) & set(environment))
        if name == "migrate":  # runs once
            assert service["restart"] == "no"
            continue
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"], name
        if name not in ("redis",):
            assert service["env_file"] == ["${FARM_ENV_FILE:-deploy/farm.env}"], name
    redis = compose["services"]["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])


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


def node_resources(compose: dict) -> dict[str, dict[str, float]]:
    """Service -> the Ray resources its `farm ray start --resources JSON` offers."""
    nodes = {}
    for name, service in compose["services"].items():
        command = service.get("command") or []
        parts = ([shlex.split(p) for p in command[2].split("&&")] if command[:2] == ["sh", "-c"]
                 else [command])
        for words in parts:
            if words[:3] == ["farm", "ray", "start"] and "--resources" in words:
                nodes[name] = json.loads(words[words.index("--resources") + 1])
    return nodes


def group_problems(compose: dict, catalog, rules) -> list[str]:
    """Each route's tier has a node, and every node of that tier holds the route's group
    (a STRICT_PACK placement group of `degree` slots; split: one group per expert)."""
    nodes = node_resources(compose)
    problems = []
    for rule in rules.rules:
        for choice in [rule.route] + [f.route for f in rule.fallbacks]:
            resource = catalog.tiers[choice.tier].ray_resource
            slots = {n: r[resource] for n, r in nodes.items() if r.get(resource)}
            groups = 2 if choice.placement == "split" else 1
            if not slots:
                problems.append(f"{rule.name}: no node offers {resource}")
            for node, have in slots.items():  # a split pair is one pool member, one node
                if have < groups * choice.degree:
                    problems.append(f"{rule.name}: {node} offers {have} {resource}; the "
                                    f"route's {groups} group(s) of {choice.degree} need "
                                    f"{groups * choice.degree} on one node")
    return problems


def test_each_render_node_holds_the_groups_its_routes_need():
    from scheduler.catalog import parse_catalog
    from scheduler.rules import parse_rules

    config = ROOT / "scheduler" / "config"
    catalog = parse_catalog((config / "tiers.yaml").read_text(),
                            (config / "models.yaml").read_text())
    rules = parse_rules((config / "rules.yaml").read_text(), catalog)
    compose = yaml.safe_load(COMPOSE.read_text())
    assert group_problems(compose, catalog, rules) == []
    # One slot per GPU of the node, as tiers.yaml declares the tier's nodes.
    for node, resources in node_resources(compose).items():
        for tier in catalog.tiers.values():
            if tier.ray_resource in resources:
                assert resources[tier.ray_resource] == tier.gpus_per_node, node
    # What the file had before issue #11: one a100 slot a node, finals at degree 2.
    before = yaml.safe_load(COMPOSE.read_text().replace('\\"tier:a100\\": 8',
                                                        '\\"tier:a100\\": 1'))
    assert ("finals: worker-render-a100 offers 1 tier:a100; the route's 1 group(s) of 2 need "
            "2 on one node") in group_problems(before, catalog, rules)


def test_each_render_nodes_worker_can_drive_every_group_of_the_node():
    """One render task drives one actor group (issue #11): a node's Celery render worker
    needs two processes per GPU of the node (DRIVERS_PER_SLOT), or groups sit idle while a
    driver encodes its last chunks."""
    compose = yaml.safe_load(COMPOSE.read_text())
    nodes = node_resources(compose)
    checked = 0
    for name, argv in farm_invocations():
        if name in nodes and argv[:1] == ["worker"]:
            slots = sum(v for k, v in nodes[name].items() if k.startswith("tier:"))
            assert int(argv[argv.index("--concurrency") + 1]) == DRIVERS_PER_SLOT * slots, (
                name, argv, slots)
            checked += 1
    assert checked >= 3  # the cpu, a10 and a100 nodes
