"""Starting and joining Ray, kept on loopback and quiet.

Without these settings Ray reports usage stats and probes a cloud metadata address at every
start; nothing the farm starts may contact anything but loopback. Ray reads some of them
once, when it is first imported: call `quiet_ray_env()` before anything imports Ray (the
`farm` commands that use Ray do).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

NAMESPACE = "farm"
LOOPBACK = "127.0.0.1"


def quiet_ray_env(node_ip: str = LOOPBACK, token_file: Path | str | None = None) -> None:
    """Set Ray's environment for this process and its children; write the bootstrap file.
    ``token_file``: the cluster's auth token shared by every host (FARM_RAY_AUTH_TOKEN_FILE,
    issue #14); unset: Ray's own $HOME/.ray/auth_token."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_USAGE_STATS_REPORT_URL"] = "http://127.0.0.1:9/"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Token auth (Ray's default for new clusters) stated outright, so that a driver joining
    # an existing head sends the token in $HOME/.ray/auth_token too.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if token_file:
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    if node_ip in (LOOPBACK, "localhost"):
        # Ray rewrites 127.0.0.1 to the machine's reachable address unless told this is a
        # one-machine cluster; then every Ray server binds to loopback.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        # Ray reads that variable once, at import; a process that imported Ray already gets
        # the same setting on the module.
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None:
            constants.ENABLE_RAY_CLUSTER = False
    bootstrap = Path.home() / "ray_bootstrap_config.yaml"
    if not bootstrap.exists():  # its absence makes Ray probe 169.254.169.254
        bootstrap.write_text("provider: {type: local}\n")


def connect(address: str, *, tier_slots: int = 2, temp_dir: str = "/tmp/ray-farm",
            object_store_bytes: int = 512 * 1024 * 1024, node_ip: str = LOOPBACK,
            token_file: Path | str | None = None) -> None:
    """Join the cluster at ``address`` ("host:port", or "auto" for this machine's node), or
    start one in-process for "local"."""
    import ray

    if ray.is_initialized():
        return
    quiet_ray_env(node_ip, token_file)
    if address == "local":
        # address="local": a cluster of its own, always. Without it Ray joins the cluster that
        # `ray_current_cluster` in the temp dir names, a file a stopped head leaves behind
        # (even one stopped cleanly), and then refuses `resources` (issue #11).
        ray.init(address="local", namespace=NAMESPACE, _node_ip_address=LOOPBACK, include_dashboard=False,
                 object_store_memory=object_store_bytes, _temp_dir=temp_dir,
                 resources={"tier:cpu": tier_slots}, log_to_driver=False,
                 configure_logging=False)
    else:
        ray.init(address=address, namespace=NAMESPACE, _node_ip_address=node_ip,
                 log_to_driver=False, configure_logging=False)


def ensure_auth_token() -> Path:
    """A head started with token auth needs $HOME/.ray/auth_token; a fresh machine has none.
    Nodes and drivers that join it must see the same file (compose shares the folder)."""
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):  # a shared file (FARM_RAY_AUTH_TOKEN_FILE)
        token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
        if os.environ.get("RAY_AUTH_MODE", "token") == "token" and not token.is_file():
            token.parent.mkdir(parents=True, exist_ok=True)
            token.touch(mode=0o600)
            token.write_text(secrets.token_hex(32))
        return token
    token = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_MODE", "token") == "token" and not token.is_file():
        subprocess.run(_ray_cli() + ["get-auth-token", "--generate"], check=True,
                       capture_output=True, text=True)
    return token


def _ray_cli() -> list[str]:
    exe = Path(sys.executable).parent / "ray"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


def start_node(port: int, *, tier_slots: int, temp_dir: str, object_store_bytes: int,
               head_address: str | None = None, node_ip: str = LOOPBACK,
               resources: dict | None = None, num_cpus: int | None = None,
               dashboard: bool = False, block: bool = False) -> subprocess.CompletedProcess:
    """`ray start`: a head on ``port``, or a node joining ``head_address``, with the tier
    resources (default: the cpu tier's ``tier_slots`` actors)."""
    quiet_ray_env(node_ip)
    resources = resources if resources is not None else {"tier:cpu": tier_slots}
    cmd = _ray_cli() + [
        "start", f"--node-ip-address={node_ip}", f"--resources={json.dumps(resources)}",
        f"--object-store-memory={object_store_bytes}", "--disable-usage-stats",
    ]
    if head_address:
        cmd.append(f"--address={head_address}")
    else:
        ensure_auth_token()
        cmd += ["--head", f"--port={port}", f"--temp-dir={temp_dir}",
                f"--include-dashboard={'true' if dashboard else 'false'}",
                f"--dashboard-host={LOOPBACK}"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if block:  # become `ray start --block`, so a supervisor's SIGTERM reaches Ray itself
        os.execv(cmd[0], cmd + ["--block"])
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


def stop_all() -> None:
    """`ray stop`: ends the Ray processes this user started on this machine."""
    quiet_ray_env()
    subprocess.run(_ray_cli() + ["stop", "--force"], check=False, capture_output=True)


def shutdown_local() -> None:
    """End an in-process Ray started by `connect("local")` (no-op otherwise)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
