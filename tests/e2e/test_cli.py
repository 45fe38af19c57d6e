"""The `farm` CLI: client commands against the live API, and the one-process `farm render`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import RUN_ID
from workers.video import probe

pytestmark = pytest.mark.e2e
FARM = str(Path(sys.executable).parent / "farm")


def farm(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([FARM, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or dict(os.environ))


def test_submit_wait_status_download_cancel(api_url, tmp_path):
    env = dict(os.environ, FARM_API_URL=api_url)
    submitted = farm("submit", "a yellow triangle moving up", "--frames", "9", "--steps", "3",
                     "--seed", "4", env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    waited = farm("wait", job_id, env=env)
    assert waited.returncode == 0, waited.stderr
    assert "succeeded" in waited.stdout
    status = json.loads(farm("status", job_id, env=env).stdout)
    assert status["state"] == "succeeded" and status["seed"] == 4
    # A draft (the default track) of wan-toy renders its shipped draft variant (issue #12).
    assert (status["model"], status["route"]["track_of"]) == ("wan-toy-draft", "wan-toy")
    logs = farm("logs", job_id, env=env)
    assert logs.returncode == 0, logs.stderr
    kinds = [line.split()[1] for line in logs.stdout.splitlines()]
    assert kinds == ["segment_started", "segment_rendered", "segment_done"]
    assert "segment 0 render-" in logs.stdout
    assert re.search(r"on render:wan-toy-draft:cpu:g[01]\b", logs.stdout), logs.stdout
    out = tmp_path / "cli.mp4"
    assert farm("download", job_id, "-o", str(out), env=env).returncode == 0
    assert probe(out).frames == 9
    again = farm("cancel", job_id, env=env)
    assert again.returncode == 1 and "already ended: succeeded" in again.stderr
    bad = farm("submit", "x", "--frames", "8", env=env)
    assert bad.returncode == 1 and "frames" in bad.stderr and "got 8" in bad.stderr


def test_servers_listen_on_loopback_only(api_url, flower_url, celery_workers, settings):
    """Ray, the API, Flower and the workers started by the tests bind nothing but loopback."""
    ours = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(settings.ray_temp_dir) in cmdline or f"farm-tests-{RUN_ID}" in cmdline:
            ours.add(proc.info["pid"])
    for parent in [psutil.Process(), *(psutil.Process(w.proc.pid) for w in celery_workers)]:
        ours |= {parent.pid} | {c.pid for c in parent.children(recursive=True)}
    listening = [c for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listening, "expected the servers to be listening"
    exposed = [(c.laddr, psutil.Process(c.pid).name()) for c in listening
               if c.laddr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert exposed == []


def test_render_in_one_process_with_embedded_defaults(tmp_path, tiny_model):
    """No PostgreSQL, Redis or Ray head: SQLite, eager tasks, in-process Ray, local files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env["FARM_HOME"] = str(tmp_path / "home")
    env["FARM_MODELS_DIR"] = str(tiny_model.parent)
    env["FARM_RAY_TEMP_DIR"] = str(Path("/tmp") / f"rfr-{tmp_path.name[-6:]}")
    out = tmp_path / "render.mp4"
    result = farm("render", "a cyan square moving right", "-o", str(out), "--frames", "21",
                  "--seed", "7", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    info = probe(out)
    assert (info.width, info.height, info.frames, info.codec) == (1280, 720, 21, "h264")
    assert (tmp_path / "home" / "farm.db").is_file()
    assert "wrote" in result.stdout and str(out) in result.stdout


def test_failed_render_keeps_its_record_and_says_why(tmp_path, tiny_model):
    """A model with no checkpoint on this machine: the job fails with a clear error and stays."""
    import sqlite3

    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(FARM_HOME=str(tmp_path / "home"), FARM_MODELS_DIR=str(tiny_model.parent),
               FARM_RAY_TEMP_DIR=f"/tmp/rff-{tmp_path.name[-6:]}")
    result = farm("render", "a red circle", "--model", "wan2.2-t2v-a14b", "--frames", "5",
                  "-o", str(tmp_path / "never.mp4"), env=env)
    assert result.returncode == 1
    assert "has no checkpoint at" in result.stderr
    assert not (tmp_path / "never.mp4").exists()
    with sqlite3.connect(tmp_path / "home" / "farm.db") as db:
        state, error = db.execute("SELECT state, error FROM jobs").fetchone()
        seg_state, seg_error = db.execute("SELECT state, error FROM segments").fetchone()
    assert state == "failed" and "ModelUnavailable" in error
    assert seg_state == "failed" and "Wan2.2-T2V-A14B-Diffusers" in seg_error


def test_a_render_failing_in_one_process_fails_its_job_at_once(tmp_path, tiny_model):
    """An error the farm would retry on another worker (storage it cannot write): in one
    process there is no other worker, so the job fails with it, and is not left running."""
    import sqlite3

    (tmp_path / "a-file").write_text("not a folder")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(FARM_HOME=str(tmp_path / "home"), FARM_MODELS_DIR=str(tiny_model.parent),
               FARM_RAY_TEMP_DIR=f"/tmp/rfe-{tmp_path.name[-6:]}",
               FARM_STORAGE_URL=f"file://{tmp_path}/a-file/storage")
    result = farm("render", "a red circle", "--model", "wan-tiny", "--frames", "5",
                  "-o", str(tmp_path / "never.mp4"), env=env)
    assert result.returncode == 1
    assert "NotADirectoryError" in result.stderr
    with sqlite3.connect(tmp_path / "home" / "farm.db") as db:
        state, error = db.execute("SELECT state, error FROM jobs").fetchone()
    assert state == "failed" and error.startswith("segment 0: NotADirectoryError")


def test_render_refuses_bad_input_naming_the_field(tmp_path):
    env = dict(os.environ, FARM_HOME=str(tmp_path))
    result = farm("render", "a red circle", "--width", "1000", env=env)
    assert result.returncode == 2
    assert "width" in result.stderr and "multiple of 16" in result.stderr and "1000" in result.stderr


def test_ray_head_starts_on_a_machine_without_ray_state(tmp_path):
    """A fresh HOME has no Ray auth token: `farm ray start` makes one and drivers can join."""
    import signal
    import socket
    import time

    from tests.conftest import free_port

    port = free_port()
    env = dict(os.environ, HOME=str(tmp_path), FARM_RAY_HEAD_PORT=str(port),
               FARM_RAY_TEMP_DIR=f"/tmp/rfh-{port}")
    env.pop("RAY_AUTH_MODE", None)
    head = subprocess.Popen([FARM, "ray", "start", "--block", "--num-cpus", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None, head.stdout.read().decode()[-2000:]
                time.sleep(0.3)
        assert (tmp_path / ".ray" / "auth_token").is_file()
        join = subprocess.run(
            [sys.executable, "-c",
             "from workers.ray_cluster import connect, quiet_ray_env; quiet_ray_env(); "
             f"import ray; connect('127.0.0.1:{port}'); "
             "print(ray.cluster_resources()['tier:cpu'])"],
            env=env, capture_output=True, text=True, timeout=120)
        assert join.returncode == 0, join.stderr[-2000:]
        assert join.stdout.strip().splitlines()[-1] == "2.0"
    finally:  # SIGTERM to `ray start --block` alone: it stops its processes (conftest.py)
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=60)
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything it left
        except ProcessLookupError:
            pass


def test_client_commands_say_when_the_api_cannot_be_reached():
    env = dict(os.environ, FARM_API_URL="http://127.0.0.1:9")  # nothing listens on port 9
    for args in (("status", "abc"), ("batch", "status", "abc")):
        result = farm(*args, env=env)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "cannot reach the farm's API at http://127.0.0.1:9" in result.stderr
