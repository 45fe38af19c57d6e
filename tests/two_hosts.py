"""A second host for the tests (issue #14): a network namespace joined to this machine by a
veth pair on a private /30 link, nothing else routed. The first host (this machine's side
of the link) runs PostgreSQL, Redis, SeaweedFS's S3, the Ray head, the API, beat and the
stitch worker; the second runs a Ray worker node with the `cpu-remote` tier's resource and
a Celery render worker for that tier. Every server listens on its host's link address or
loopback: the namespace cannot reach this machine's loopback, so the farm's traffic
between the hosts (the database, the broker, Ray, the chunks) crosses the link.

scripts/two-hosts.sh makes the same two hosts for a person.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from pathlib import Path

import yaml

from tests.conftest import BIN, RUN_ID, TMP, Service, signal_group

REMOTE_TIER = "cpu-remote"
REMOTE_PROJECT = "remote"


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


class Link:
    """The namespace and its veth pair. ``octet``: the /30 is 10.213.<octet>.0, chosen per
    test session so that two sessions never share an address (scripts/two-hosts.sh: 0)."""

    def __init__(self, tag: str = RUN_ID[:6], octet: int | None = None):
        octet = 1 + int(RUN_ID[:2], 16) % 255 if octet is None else octet
        self.ns, self.host_if, self.ns_if = f"farm2h-{tag}", f"f2h{tag}a", f"f2h{tag}b"
        self.host_ip, self.remote_ip = f"10.213.{octet}.1", f"10.213.{octet}.2"

    def create(self) -> "Link":
        run("ip", "netns", "add", self.ns)
        run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        run("ip", "link", "set", self.ns_if, "netns", self.ns)
        run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        run("ip", "link", "set", self.host_if, "up")
        self.in_ns("ip", "addr", "add", f"{self.remote_ip}/30", "dev", self.ns_if)
        self.in_ns("ip", "link", "set", self.ns_if, "up")
        self.in_ns("ip", "link", "set", "lo", "up")
        return self

    def in_ns(self, *args: str) -> None:
        run("ip", "netns", "exec", self.ns, *args)

    def cut(self) -> None:
        """The second host loses its link (its side of the cable pulled)."""
        self.in_ns("ip", "link", "set", self.ns_if, "down")

    def restore(self) -> None:
        self.in_ns("ip", "link", "set", self.ns_if, "up")

    def routes(self) -> str:
        return subprocess.run(["ip", "netns", "exec", self.ns, "ip", "-4", "route"],
                              capture_output=True, text=True, check=True).stdout

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def destroy(self) -> None:
        """SIGKILL whatever still runs in the namespace, then remove it and the pair."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


class RemoteService(Service):
    """A farm command running on the second host (inside the namespace)."""

    def __init__(self, link: Link, name: str, args: list[str], env: dict[str, str]):
        self.name, self.log = name, TMP / f"{name}.log"
        self.signal_group = signal_group(args)
        # `ip netns exec` execs the command: the pid is the farm process, its group ours.
        self.proc = subprocess.Popen(["ip", "netns", "exec", link.ns, str(BIN / "farm"), *args],
                                     stdout=self.log.open("a"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **env}, start_new_session=True)


def remote_policy(folder: Path) -> dict[str, str]:
    """The shipped tiers and rules plus the tier `cpu-remote` (the second host's Ray node
    offers its resource) and a rule sending the project `remote` there."""
    config = Path(__file__).resolve().parent.parent / "scheduler" / "config"
    tiers = yaml.safe_load((config / "tiers.yaml").read_text())
    tiers["tiers"][REMOTE_TIER] = dict(tiers["tiers"]["cpu"], gpus_per_node=1,
                                       ray_resource=f"tier:{REMOTE_TIER}")
    rules = yaml.safe_load((config / "rules.yaml").read_text())
    rules["rules"].insert(0, {"name": "remote-project",
                              "match": {"project": [REMOTE_PROJECT], "model": ["wan-tiny"]},
                              "route": {"tier": REMOTE_TIER}})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiers.yaml").write_text(yaml.safe_dump(tiers))
    (folder / "rules.yaml").write_text(yaml.safe_dump(rules))
    return {"FARM_TIERS_FILE": str(folder / "tiers.yaml"),
            "FARM_RULES_FILE": str(folder / "rules.yaml")}


def ray_env(link: Link, head_port: int, folder: Path) -> dict[str, str]:
    """The multi-host Ray settings every process of both hosts shares (README, "Two
    hosts"): the head's address, the shared token file. FARM_RAY_NODE_IP is per host."""
    token = folder / "ray-auth-token"
    if not token.exists():
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))
    return {"FARM_RAY_ADDRESS": f"{link.host_ip}:{head_port}",
            "FARM_RAY_HEAD_PORT": str(head_port),
            "FARM_RAY_AUTH_TOKEN_FILE": str(token),
            # Ray treats a non-loopback node address as a cluster of many machines only
            # with this on (the session's loopback settings turn it off).
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            # A host may be unreachable for 60 s (20 checks, 3 s apart) before the head
            # declares its node dead: a 20 s link loss must not end the second host's node.
            "RAY_health_check_failure_threshold": "20"}


def listeners(pids: set[int], netns: str | None = None) -> list[tuple[str, str, int]]:
    """(local address, process name, pid) of every TCP listener of ``pids`` (on the host, or in the
    namespace ``netns``)."""
    cmd = ["ss", "-Hltnp"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    found = []
    for line in subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines():
        fields = line.split()
        owners = {int(part.split(",")[0]) for part in line.split("pid=")[1:]} & pids
        if owners:
            found.append((fields[3], line.split('(("')[1].split('"')[0], min(owners)))
    return found


def descendants(root_pids: set[int]) -> set[int]:
    """``root_pids`` and every process below them (by /proc's parent links)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, grew = set(root_pids), True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


def pids_with(text: str) -> set[int]:
    """Processes whose command line contains ``text`` (a temp dir only this stack uses)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.add(int(entry.name))
            except OSError:
                continue
    return found
