"""`farm up` with the embedded defaults: no PostgreSQL, no Redis, no Ray head to start first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import free_port
from workers.video import probe

pytestmark = pytest.mark.e2e


def test_up_serves_a_job_with_embedded_defaults(tmp_path, tiny_model):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    api_port, flower_port, ray_port = free_port(), free_port(), free_port()
    env.update(FARM_HOME=str(tmp_path / "home"), FARM_MODELS_DIR=str(tiny_model.parent),
               FARM_API_PORT=str(api_port), FARM_FLOWER_PORT=str(flower_port),
               FARM_RAY_HEAD_PORT=str(ray_port), FARM_RAY_TEMP_DIR=f"/tmp/rfu-{ray_port}",
               FARM_FLOWER_PASSWORD="pw")
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen([str(Path(sys.executable).parent / "farm"), "up"], env=env,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{api_port}"
    try:
        deadline, healthy = time.monotonic() + 90, False
        while not healthy and time.monotonic() < deadline:
            try:
                healthy = httpx.get(f"{api}/healthz").status_code == 200
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert healthy, (tmp_path / "up.log").read_text()[-3000:]
        # `farm up` wrote a key of the project `default` for this machine's CLI.
        key = (tmp_path / "home" / "api_key").read_text().strip()
        assert (tmp_path / "home" / "api_key").stat().st_mode & 0o077 == 0
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{api}/v1/jobs").status_code == 401
        job_id = httpx.post(f"{api}/v1/jobs", headers=auth,
                            json={"prompt": "a white circle", "frames": 9, "model": "wan-toy",
                                  "steps": 2}).json()["id"]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            job = httpx.get(f"{api}/v1/jobs/{job_id}", headers=auth).json()
            if job["state"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.5)
        assert job["state"] == "succeeded", (job, (tmp_path / "up.log").read_text()[-3000:])
        video = tmp_path / "up.mp4"
        video.write_bytes(httpx.get(f"{api}/v1/jobs/{job_id}/video", headers=auth).content)
        assert probe(video).frames == 9
        flower = httpx.get(f"http://127.0.0.1:{flower_port}/api/workers", auth=("admin", "pw"))
        assert flower.status_code == 200
        assert httpx.get(f"http://127.0.0.1:{flower_port}/api/workers").status_code == 401
    finally:
        children = psutil.Process(up.pid).children(recursive=True)
        os.kill(up.pid, signal.SIGTERM)
        up.wait(timeout=60)
        _, alive = psutil.wait_procs(children, timeout=5)
    # Everything it started went down with it (Ray's agents would outlive their raylet).
    assert [p.name() for p in alive] == []
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if f"/tmp/rfu-{ray_port}" in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
    # Issue #11.9: the stopped head left `ray_current_cluster` behind in FARM_RAY_TEMP_DIR;
    # `farm render` on the same machine (its own in-process Ray) must not try to join it.
    assert (Path(f"/tmp/rfu-{ray_port}") / "ray_current_cluster").exists()
    render = subprocess.run([str(Path(sys.executable).parent / "farm"), "render", "a white circle",
                             "--model", "wan-toy", "--frames", "9", "--steps", "2",
                             "-o", str(tmp_path / "render.mp4")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert render.returncode == 0, render.stderr[-3000:]
    assert probe(tmp_path / "render.mp4").frames == 9
