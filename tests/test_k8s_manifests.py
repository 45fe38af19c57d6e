"""deploy/k8s (issue #14, item 2): the core kinds validate against the Kubernetes schemas
(kubernetes-validate, strict: no unknown fields), so do the pod templates inside the
RayCluster; the custom resources (KubeRay's RayCluster, KEDA's ScaledObject), for which
kubernetes-validate has no schema, validate against the small schemas below, written from
the fields KubeRay's and KEDA's documentation lists as required. And the manifests agree
with the farm: a worker group per tier holding the groups its routes need, a render worker
per tier's queue, a ScaledObject per tier reading `farm_jobs_waiting` for that tier."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from farm.cli.main import app
from farm.cli.services import DRIVERS_PER_SLOT

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
CORE_KINDS = {"Namespace", "ConfigMap", "Secret", "Deployment", "Service"}
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"spec": {
    "type": "object", "required": ["containers"],
    "properties": {"containers": {"type": "array", "minItems": 1}}}}}
# KubeRay ray.io/v1 RayCluster: headGroupSpec (rayStartParams, template) is required; each
# worker group needs groupName, rayStartParams and template (and its replica bounds).
RAY_CLUSTER = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["headGroupSpec"], "properties": {
            "rayVersion": {"type": "string"},
            "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"],
                              "properties": {"rayStartParams": STRINGS, "template": TEMPLATE}},
            "workerGroupSpecs": {"type": "array", "items": {
                "type": "object",
                "required": ["groupName", "rayStartParams", "template", "minReplicas",
                             "maxReplicas"],
                "properties": {"groupName": {"type": "string"},
                               "replicas": {"type": "integer", "minimum": 0},
                               "minReplicas": {"type": "integer", "minimum": 0},
                               "maxReplicas": {"type": "integer", "minimum": 0},
                               "rayStartParams": STRINGS, "template": TEMPLATE}}}}}}}
# KEDA keda.sh/v1alpha1 ScaledObject: scaleTargetRef.name and at least one trigger; the
# prometheus trigger's metadata needs serverAddress, query and threshold (strings).
SCALED_OBJECT = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["scaleTargetRef", "triggers"], "properties": {
            "scaleTargetRef": {"type": "object", "required": ["name"]},
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "triggers": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["type", "metadata"],
                "properties": {"metadata": STRINGS},
                "if": {"properties": {"type": {"const": "prometheus"}}},
                "then": {"properties": {"metadata": {
                    "required": ["serverAddress", "query", "threshold"]}}}}}}}}}
CRD_SCHEMAS = {"RayCluster": RAY_CLUSTER, "ScaledObject": SCALED_OBJECT}


def documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def policy():
    from scheduler.catalog import parse_catalog
    from scheduler.rules import parse_rules

    config = ROOT / "scheduler" / "config"
    catalog = parse_catalog((config / "tiers.yaml").read_text(),
                            (config / "models.yaml").read_text())
    return catalog, parse_rules((config / "rules.yaml").read_text(), catalog)


def test_every_manifest_validates_against_its_schema():
    version = kubernetes_validate.latest_version()
    kinds = set()
    for name, doc in documents():
        kinds.add(doc["kind"])
        if doc["kind"] in CORE_KINDS:
            kubernetes_validate.validate(doc, version, strict=True)
        else:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
    assert kinds == CORE_KINDS | set(CRD_SCHEMAS)
    # The pods KubeRay makes from the RayCluster's templates are core Pods: validated too.
    cluster = of_kind("RayCluster")[0]["spec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "template"},
               "spec": group["template"]["spec"]}
        kubernetes_validate.validate(pod, version, strict=True)


def test_the_validators_refuse_a_broken_manifest():
    """The checks above can fail: an unknown field, a worker group without its name, a
    prometheus trigger without its query."""
    version = kubernetes_validate.latest_version()
    deployment = json.loads(json.dumps(of_kind("Deployment")[0]))
    deployment["spec"]["template"]["spec"]["containers"][0]["comand"] = ["farm"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, version, strict=True)
    cluster = json.loads(json.dumps(of_kind("RayCluster")[0]))
    del cluster["spec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cluster, RAY_CLUSTER)
    scaled = json.loads(json.dumps(of_kind("ScaledObject")[0]))
    del scaled["spec"]["triggers"][0]["metadata"]["query"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, SCALED_OBJECT)


def render_pods() -> dict[str, tuple[dict[str, float], dict]]:
    """Each Ray node's pod, by name -> (the Ray resources it offers, its pod spec): the
    RayCluster's worker groups and the burst Deployments."""
    pods = {}
    for group in of_kind("RayCluster")[0]["spec"]["workerGroupSpecs"]:
        resources = json.loads(shlex.split(group["rayStartParams"]["resources"])[0])
        pods[f"group {group['groupName']}"] = (resources, group["template"]["spec"])
    for deployment in of_kind("Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        for container in spec["containers"]:
            words = shlex.split(container["command"][-1]) if container["command"][0] == "sh" \
                else container["command"]
            if "start" in words and "--resources" in words:
                resources = json.loads(words[words.index("--resources") + 1])
                pods[deployment["metadata"]["name"]] = (resources, spec)
    return pods


def test_each_tier_has_nodes_holding_the_groups_its_routes_need():
    catalog, rules = policy()
    pods = render_pods()
    for tier in catalog.tiers.values():
        holders = {n: r for n, (r, _) in pods.items() if tier.ray_resource in r}
        assert {f"group {tier.name}", f"farm-render-{tier.name}"} <= set(holders), tier.name
        for name, resources in holders.items():  # one slot a GPU, as tiers.yaml declares
            assert resources == {tier.ray_resource: tier.gpus_per_node}, name
    for rule in rules.rules:
        for choice in [rule.route] + [f.route for f in rule.fallbacks]:
            need = (2 if choice.placement == "split" else 1) * choice.degree
            resource = catalog.tiers[choice.tier].ray_resource
            assert all(r[resource] >= need for r in (r for r, _ in pods.values())
                       if resource in r), (rule.name, resource, need)


def test_each_render_node_runs_its_tiers_worker_and_gpus_match_its_slots():
    catalog, _ = policy()
    for name, (resources, spec) in render_pods().items():
        (resource, slots), = resources.items()
        tier = next(t for t in catalog.tiers.values() if t.ray_resource == resource)
        workers = [c["command"] for c in spec["containers"]
                   if c.get("command", [])[1:2] == ["worker"]]  # KubeRay commands its own
        assert workers == [["farm", "worker", "--queues", f"render.{tier.name}",
                            "--concurrency", str(DRIVERS_PER_SLOT * slots)]], name
        gpus = sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                   for c in spec["containers"])
        assert gpus == (0 if tier.gpu == "cpu" else slots), name
        # The worker drives the node's Ray through the session folder they share.
        mounts = [{m["mountPath"] for m in c["volumeMounts"]} for c in spec["containers"]]
        assert all("/tmp/ray" in m and "/etc/farm/ray" in m for m in mounts), name


def test_a_scaled_object_per_tier_reads_its_waiting_jobs():
    catalog, _ = policy()
    deployments = {d["metadata"]["name"] for d in of_kind("Deployment")}
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in of_kind("ScaledObject")}
    assert set(scaled) == {f"farm-render-{t}" for t in catalog.tiers}
    assert set(scaled) <= deployments
    for tier in catalog.tiers:
        (trigger,) = scaled[f"farm-render-{tier}"]["spec"]["triggers"]
        assert trigger["metadata"]["query"] == f'sum(farm_jobs_waiting{{tier="{tier}"}})'


def test_every_farm_command_exists_and_secrets_match_the_env_example():
    runner = CliRunner()
    commands = [c["command"] for _, doc in documents() if doc["kind"] == "Deployment"
                for c in doc["spec"]["template"]["spec"]["containers"]]
    for command in commands:
        words = shlex.split(command[-1])[1:] if command[0] == "sh" else command
        args = words[1:]
        path = [a for a in args if not a.startswith("-")][:2 if args[0] == "ray" else 1]
        result = runner.invoke(app, path + ["--help"])
        assert result.exit_code == 0, (command, result.output)
        for option in (a for a in args if a.startswith("--")):
            assert option in result.output, (command, option)
    secret = of_kind("Secret")[0]["stringData"]
    example = {line.split("=", 1)[0] for line in
               (ROOT / "deploy" / "farm.env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert example - {"POSTGRES_PASSWORD"} <= set(secret)
    assert "ray-auth-token" in secret
