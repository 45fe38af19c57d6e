"""Throwaway PostgreSQL and Redis servers for the fault suite: their own port and data
directory, so a test can stop, kill and restart them without touching the machine's own."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.conftest import TMP, free_port


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]
    if not found:
        raise RuntimeError(f"{name} not found: install PostgreSQL's server binaries")
    return found if isinstance(found, str) else found[0]


class ThrowawayPostgres:
    """initdb into a temporary folder, pg_ctl start/stop on a free port (trust auth).
    PostgreSQL refuses to run as root: as root, its commands run as the `postgres` user."""

    def __init__(self, host: str = "127.0.0.1"):
        self.port, self.host = free_port(), host  # host: the one address it listens on
        self.dir = Path(tempfile.mkdtemp(prefix="farm-pg-"))
        self.data, self.log = self.dir / "data", TMP / f"postgres-{self.port}.log"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync")
        if host != "127.0.0.1":  # clients on the host's /30 link (tests/two_hosts.py)
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {host}/30 trust\n")
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *args], check=True, capture_output=True, cwd=self.dir)

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses={self.host} -c fsync=off "
                   "-c max_connections=200")
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                  str(self.dir / "server.log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.dir, ignore_errors=True)


class ThrowawayRedis:
    """redis-server on a free port with no persistence: a restart loses every queue, as the
    machine's own Redis (RUNBOOK: --save "" --appendonly no) would."""

    def __init__(self, host: str = "127.0.0.1"):
        self.port, self.host = free_port(), host  # host: the one address it listens on
        # Off loopback Redis serves only clients that know a password (protected mode).
        self.password = "" if host == "127.0.0.1" else uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self) -> None:
        import redis

        log = (TMP / f"redis-{self.port}.log").open("a")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", self.host, "--save", "",
             "--appendonly", "no", *(["--requirepass", self.password] if self.password else [])],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def destroy(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.kill()
