"""Commands that run the farm's servers: api, worker, flower, ray, and `up` (all of them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import typer

from farm.settings import get_settings
from farm.policy import get_policy
from scheduler.routing import STITCH_QUEUE, render_queue

# Celery render processes per Ray slot (GPU) of a node. One task drives one group at a time
# (issue #11); the second lets the next segment lease the group as soon as the last frame
# has left it, while the first still encodes and stores its chunks: with one, the group
# waits for the encode (measured in benchmarks/farm_throughput.py: duty 0.88 -> 0.93).
DRIVERS_PER_SLOT = 2

ray_app = typer.Typer(help="Start or stop a Ray head on loopback with the farm's settings.")


def prepare_ray_env() -> None:
    """Ray reads its environment once, when first imported: commands that use Ray call this
    before anything imports it."""
    from workers.ray_cluster import quiet_ray_env

    settings = get_settings()
    quiet_ray_env(settings.ray_node_ip, settings.ray_auth_token_file)


def all_queues() -> str:
    return ",".join([render_queue(t) for t in get_policy().catalog.tiers] + [STITCH_QUEUE])


def api(host: str = typer.Option(None, help="default: FARM_API_HOST (127.0.0.1)"),
        port: int = typer.Option(None, help="default: FARM_API_PORT (8000)")) -> None:
    """Serve the HTTP API (OpenAPI at /docs)."""
    import uvicorn

    from farm.api.app import create_app

    settings = get_settings()
    uvicorn.run(create_app(settings), host=host or settings.api_host,
                port=port or settings.api_port, log_level="info")


def worker(queues: str = typer.Option(None, "--queues", "-Q",
                                      help="comma-separated; default: every tier's and stitch"),
           concurrency: int = typer.Option(1, "--concurrency", "-c"),
           hostname: str = typer.Option(None, "--hostname", "-n"),
           loglevel: str = typer.Option("INFO", "--loglevel", "-l")) -> None:
    """Run a Celery worker. A render worker drives the actor groups of its node, one task per
    group at a time (issue #11): give it DRIVERS_PER_SLOT processes per GPU of the node."""
    prepare_ray_env()
    from farm.celery_app import app as celery

    argv = ["worker", "-Q", queues or all_queues(), "-c", str(concurrency), "-l", loglevel, "-E",
            "--without-gossip", "--without-mingle"]
    if hostname:
        argv += ["-n", hostname]
    celery.worker_main(argv)


def flower(host: str = typer.Option(None), port: int = typer.Option(None)) -> None:
    """Run Flower on loopback; basic auth when FARM_FLOWER_PASSWORD is set."""
    from farm.celery_app import app as celery

    settings = get_settings()
    argv = ["flower", f"--address={host or settings.flower_host}",
            f"--port={port or settings.flower_port}"]
    password = settings.flower_password.get_secret_value()
    if password:
        argv.append(f"--basic-auth={settings.flower_user}:{password}")
    celery.start(argv)


def beat(loglevel: str = typer.Option("INFO", "--loglevel", "-l")) -> None:
    """Run Celery beat: the tick that opens batch windows and releases waiting jobs."""
    from farm.celery_app import app as celery

    settings = get_settings()
    settings.ensure_dirs()
    celery.start(["beat", "-l", loglevel,
                  f"--schedule={settings.home / 'celerybeat-schedule'}"])


@ray_app.command("start")
def ray_start(port: int = typer.Option(None, help="head port; default FARM_RAY_HEAD_PORT (6380)"),
              address: str = typer.Option(None, help="join this head instead of starting one"),
              node_ip: str = typer.Option(None, help="default FARM_RAY_NODE_IP (127.0.0.1)"),
              resources: str = typer.Option(None, help='JSON, e.g. {"tier:a100": 8}; '
                                                       'default: the cpu tier'),
              block: bool = typer.Option(False, help="stay in the foreground (containers)"),
              num_cpus: int = typer.Option(None)) -> None:
    """Start a Ray head (or join one) with the farm's tier resources, loopback by default."""
    import json

    prepare_ray_env()
    from workers import ray_cluster

    settings = get_settings()
    port = port or settings.ray_head_port
    try:
        ray_cluster.start_node(port, tier_slots=settings.ray_tier_slots,
                               temp_dir=str(settings.ray_temp_dir),
                               object_store_bytes=settings.ray_object_store_bytes,
                               head_address=address, node_ip=node_ip or settings.ray_node_ip,
                               resources=json.loads(resources) if resources else None,
                               num_cpus=num_cpus, block=block)
    except subprocess.CalledProcessError as exc:
        typer.echo(f"ray start failed:\n{exc.stderr[-2000:]}", err=True)
        raise typer.Exit(1) from None
    if not address:
        typer.echo(f"ray head on {node_ip or settings.ray_node_ip}:{port}; "
                   f"set FARM_RAY_ADDRESS to that address")


@ray_app.command("stop")
def ray_stop() -> None:
    """Stop the Ray processes started on this machine."""
    prepare_ray_env()
    from workers import ray_cluster

    ray_cluster.stop_all()


def _stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every service, then to whatever they started that outlived them (Ray's
    dashboard and runtime-env agents survive their raylet by minutes)."""
    import psutil

    started = psutil.Process().children(recursive=True)
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    leftovers = [child for child in started if child.is_running()]
    for child in leftovers:
        child.terminate()
    for child in psutil.wait_procs(leftovers, timeout=10)[1]:
        child.kill()


def up(with_flower: bool = typer.Option(True, "--flower/--no-flower")) -> None:
    """Everything on one machine: database migrated, Ray head, API, Celery worker and beat,
    Flower."""
    from farm.db.migrate import upgrade

    prepare_ray_env()
    settings = get_settings()
    settings.ensure_dirs()
    upgrade(settings.database_url)
    key_file = settings.home / "api_key"
    if not key_file.exists() and not settings.api_key.get_secret_value():
        from farm.jobs import keys

        _, key = keys.create_key(settings.database_url, "default", "farm up")
        key_file.touch(mode=0o600)
        key_file.write_text(key + "\n")
        typer.echo(f"API key for project 'default' written to {key_file} (the CLI reads it)")
    env = dict(os.environ)
    farm = [sys.executable, "-m", "farm.cli.main"]
    commands = []
    if settings.ray_address == "local":  # a head of our own, stopped with the rest
        commands.append(farm + ["ray", "start", "--block"])
        env["FARM_RAY_ADDRESS"] = f"{settings.ray_node_ip}:{settings.ray_head_port}"
        # On SIGTERM a Ray node drains first, up to 30 s, for its actors' work to move to
        # other nodes: here there are none and everything stops together.
        env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    # Render queues and stitch on separate workers: stitching and beat's ticks never wait
    # behind a long render.
    renders = ",".join(render_queue(t) for t in get_policy().catalog.tiers)
    # One render task drives one group: DRIVERS_PER_SLOT per slot of the local head's tiers.
    drivers = DRIVERS_PER_SLOT * settings.ray_tier_slots
    commands += [farm + ["api"], farm + ["worker", "-Q", renders, "-c", str(drivers)],
                 farm + ["worker", "-Q", STITCH_QUEUE, "-c", "2"], farm + ["beat"]]
    commands += [farm + ["flower"]] if with_flower else []
    procs = [subprocess.Popen(cmd, env=env) for cmd in commands]
    typer.echo(f"farm is up: API {settings.api_url} (docs at /docs), Flower "
               f"http://{settings.flower_host}:{settings.flower_port}; Ctrl-C stops it")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    dead = None
    try:
        while not stopping and dead is None:
            dead = next((i for i, p in enumerate(procs) if p.poll() is not None), None)
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        _stop_all(procs)
    if dead is not None:
        typer.echo(f"`{' '.join(commands[dead][3:])}` exited with {procs[dead].returncode}; "
                   f"stopped the rest", err=True)
        raise typer.Exit(procs[dead].returncode or 1)
