"""The farm's throughput against a bare loop of the same renders and encodes (issue #11).

    .venv/bin/python benchmarks/farm_throughput.py              # 8 jobs of 40 steps (~4 min)
    .venv/bin/python benchmarks/farm_throughput.py --steps 200  # render-heavy jobs (~6 min)
    .venv/bin/python benchmarks/farm_throughput.py --jobs 4

Three runs in one process, all with the shipped toy model on this machine's cores:

1. bare: one Python loop renders each job with `WanT2V` on ``--threads`` torch threads,
   decodes, encodes the chunks with the farm's encoder and joins them, one job after
   another;
2. the farm with one group of ``--threads`` threads: PostgreSQL (a throwaway database on
   127.0.0.1:5432), Redis (database 14, flushed), a Ray head whose cpu tier holds one group,
   a Celery render worker (DRIVERS_PER_SLOT processes a group), a stitch worker and beat;
   the group is warmed by one job, then N jobs are submitted at once and timed from the
   first submission to the last success;
3. the same farm with two groups, torch threads = cores / groups (FARM_ACTOR_CPUS).

``--threads`` defaults to 1: on this machine (2 cores) the toy renders a job in 0.93 s on
one thread and 1.20 s on two, in a quiet process; two threads also suffer most from the
farm's other processes waking up beside them (an actor on two threads took 1.95 s a job).

Each group's duty cycle comes from the job logs: the `segment_rendered` events hold when
the actor began each render (its own clock) and when the last frame left it; a group's
duty is its render time over the wall time from its first render's start to its last's end.

The farm's processes' CPU seconds per job, by role (benchmarks/proc_cpu.py, from /proc),
show what the second group competes with on these cores: the work outside the actors
(drivers and their ffmpeg encodes, the stitch, PostgreSQL, Redis, Ray) as a share of the
actors' own. Jobs are submitted with ``cache: false`` and the "final" track, so every one
renders the base model (the draft track would render wan-toy's 4-step student).

Targets: farm (1 group) / bare <= 1.15; jobs per minute with 2 groups >= 1.6 x 1 group;
duty >= 0.9 for each group. The last line is the 2-group / 1-group throughput ratio.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import proc_cpu  # noqa: E402  (benchmarks/, beside this file)

TMP = Path(tempfile.mkdtemp(prefix="farm-throughput-"))
RUN = uuid.uuid4().hex[:8]
CORES = os.cpu_count() or 2
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
REDIS_DB = 14
PROMPTS = ["a red circle moving right", "a blue square moving left", "a green triangle moving up",
           "a yellow circle moving down"]
# track "final": the base model itself (the draft track renders wan-toy's 4-step student)
JOB = dict(model="wan-toy", track="final", frames=17, steps=40, width=256, height=256, fps=8)
RENDERED = re.compile(r"rendered on (\S+) from ([\d.]+) to ([\d.]+)")


def farm_env(groups: int, db_name: str, threads: int) -> dict[str, str]:
    """The FARM_* settings of a farm whose cpu tier holds ``groups`` groups."""
    import yaml

    config = ROOT / "scheduler" / "config"
    tiers = yaml.safe_load((config / "tiers.yaml").read_text())
    tiers["tiers"]["cpu"]["gpus_per_node"] = groups
    tiers_file = TMP / f"tiers-{groups}.yaml"
    tiers_file.write_text(yaml.safe_dump(tiers))
    port = 20000 + int(RUN, 16) % 20000 + groups
    return {
        "FARM_HOME": str(TMP / f"home-{groups}"),
        "FARM_TIERS_FILE": str(tiers_file),
        "FARM_DATABASE_URL": f"{PG_SERVER}/{db_name}",
        "FARM_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "FARM_RESULT_BACKEND": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "FARM_STORAGE_URL": f"file://{TMP}/storage-{groups}",
        "FARM_WORK_DIR": str(TMP / f"work-{groups}"),
        "FARM_RAY_ADDRESS": f"127.0.0.1:{port}",
        "FARM_RAY_HEAD_PORT": str(port),
        "FARM_RAY_TEMP_DIR": f"/tmp/rft-{RUN}-{groups}",
        "FARM_RAY_TIER_SLOTS": str(groups),
        "FARM_ACTOR_CPUS": str(threads),
        "FARM_TICK_SECONDS": "1",
    }


def requests(n: int, first_seed: int = 100) -> list[dict]:
    """Jobs the result cache cannot answer: each renders (issue #13's cache is measured in
    benchmarks/cache.py)."""
    return [dict(JOB, prompt=PROMPTS[i % len(PROMPTS)], seed=first_seed + i, cache=False)
            for i in range(n)]


# ---- the bare loop ------------------------------------------------------------------------


def bare_loop(jobs: list[dict], threads: int) -> float:
    """Seconds to render, encode and join every job in this process, one after another."""
    import numpy as np
    import torch

    from farm.settings import Settings
    from farm.tasks.segment_runner import chunk_due
    from workers.toy import BUNDLED_DIR
    from workers.video import concat, encode_chunk
    from workers.wan_pipeline import RenderRequest, WanT2V

    torch.set_num_threads(threads)
    settings = Settings()
    pipeline = WanT2V.from_folder(BUNDLED_DIR / "wan-toy")
    native = 32  # wan-toy renders 32x32; the encoder scales to the job's size
    work = TMP / "bare"
    work.mkdir()

    def one(i: int, job: dict) -> None:
        req = RenderRequest(job["prompt"], "", job["frames"], native, native, job["steps"],
                            4.0, 4.0, job["seed"])
        frames = np.concatenate(list(pipeline.decode_chunks(pipeline.denoise(req))))
        # The farm's chunks (farm/tasks/segment_runner.ChunkEncoder): N frames each, the
        # last one taking a short remainder; one chunk needs no join.
        size, starts = settings.encode_chunk_frames, [0]
        while chunk_due(len(frames) - starts[-1], size):
            starts.append(starts[-1] + size)
        ends = starts[1:] + [len(frames)]
        chunks = [encode_chunk(frames[a:b], work / f"{i}-{a}.mp4", job["width"],
                               job["height"], job["fps"], settings.x264_preset,
                               settings.x264_crf) for a, b in zip(starts, ends)]
        if len(chunks) > 1:
            concat(chunks, work / f"{i}.mp4")

    one(-1, jobs[0])  # warm up, as the farm's groups are
    started = time.perf_counter()
    for i, job in enumerate(jobs):
        one(i, job)
    return time.perf_counter() - started


# ---- the farm -----------------------------------------------------------------------------


class Farm:
    """A farm of real processes (Ray head, render worker, stitch worker, beat)."""

    def __init__(self, groups: int, threads: int):
        import psycopg
        import redis

        from farm.cli.services import DRIVERS_PER_SLOT

        self.groups, self.db_name = groups, f"farm_bench_{RUN}_{groups}"
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        redis.Redis(db=REDIS_DB).flushdb()
        self.env = {**os.environ, **farm_env(groups, self.db_name, threads)}
        farm = str(Path(sys.executable).parent / "farm")
        subprocess.run([farm, "db", "upgrade"], env=self.env, check=True, capture_output=True)
        self.procs = [self._start(farm, "ray", "start", "--block", "--num-cpus", str(CORES),
                                  "--resources", f'{{"tier:cpu": {groups}}}')]
        time.sleep(8)  # the head is up well within this
        self.procs += [self._start(farm, "worker", "-Q", "render.cpu",
                                   "-c", str(DRIVERS_PER_SLOT * groups),
                                   "-n", f"render-{RUN}@%h"),
                       self._start(farm, "worker", "-Q", "stitch", "-c", "2",
                                   "-n", f"stitch-{RUN}@%h"),
                       self._start(farm, "beat")]

    def _start(self, *argv: str) -> subprocess.Popen:
        name = argv[1] + ("-" + argv[argv.index("-Q") + 1] if "-Q" in argv else "")
        log = (TMP / f"{name}-{self.groups}.log").open("w")
        return subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def run(self, jobs: list[dict]) -> tuple[float, dict[str, float], dict[str, float]]:
        """Submit every job at once; -> (seconds from the first submission to the last
        success, duty per group, CPU seconds per role of the farm's processes)."""
        cpu_before = self._cpu()
        submitted, first_submit = self._submit_in_child(jobs)
        self._wait(submitted)
        seconds = time.time() - first_submit  # the child's clock: the same machine's
        return seconds, self._duty(submitted), proc_cpu.cpu_by_role(cpu_before, self._cpu())

    def _cpu(self) -> proc_cpu.Snapshot:
        """Each service started its own session (``start_new_session``)."""
        return proc_cpu.snapshot({proc.pid for proc in self.procs}, self.db_name)

    def warm(self) -> None:
        """One job per group, so every group has loaded the model before the timed run."""
        self._wait(self._submit_in_child(requests(self.groups, first_seed=10_000))[0])

    def _submit_in_child(self, jobs: list[dict]) -> tuple[list[str], float]:
        """Submit through the job service in a child process that has the farm's settings;
        -> (job ids, time.time() just before the first submission: the farm may start
        rendering while the child still submits)."""
        code = ("import json,sys,time\nfrom farm.jobs.submit import submit\n"
                "from farm.schemas import JobCreate\nfrom farm.settings import get_settings\n"
                "s=get_settings()\njobs=[JobCreate(**j) for j in json.loads(sys.stdin.read())]"
                "\nt0=time.time()\nids=[submit(s, j).id for j in jobs]\n"
                "print(json.dumps([ids, t0]))")
        import json

        out = subprocess.run([sys.executable, "-c", code], input=json.dumps(jobs), env=self.env,
                             capture_output=True, text=True, check=True, cwd=ROOT)
        ids, first_submit = json.loads(out.stdout.strip().splitlines()[-1])
        return ids, first_submit

    def _wait(self, ids: list[str], timeout_s: float = 900) -> None:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.env["FARM_DATABASE_URL"])
        deadline = time.monotonic() + timeout_s
        with engine.connect() as conn:
            while time.monotonic() < deadline:
                states = dict(conn.execute(text("SELECT id, state FROM jobs WHERE id = ANY(:ids)"),
                                           {"ids": ids}).all())
                conn.commit()
                if any(s in ("failed", "canceled") for s in states.values()):
                    raise RuntimeError(f"a job did not succeed: {states}")
                if len(states) == len(ids) and set(states.values()) == {"succeeded"}:
                    engine.dispose()
                    return
                time.sleep(0.05)
        raise RuntimeError(f"jobs not done in {timeout_s}s: {states}")

    def _duty(self, ids: list[str]) -> dict[str, float]:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.env["FARM_DATABASE_URL"])
        with engine.connect() as conn:
            messages = conn.execute(text("SELECT message FROM job_events WHERE kind = "
                                         "'segment_rendered' AND job_id = ANY(:ids)"),
                                    {"ids": ids}).scalars().all()
        engine.dispose()
        windows: dict[str, list[tuple[float, float]]] = {}
        for message in messages:
            found = RENDERED.search(message)
            if found is None:
                raise RuntimeError(f"a segment_rendered event without its window: {message!r}")
            group, began, ended = found.groups()
            windows.setdefault(group, []).append((float(began), float(ended)))
        return {group: sum(e - b for b, e in spans) /
                (max(e for _, e in spans) - min(b for b, _ in spans))
                for group, spans in sorted(windows.items())}

    def stop(self) -> None:
        import psycopg

        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')


def timed_farm(groups: int, threads: int,
               jobs: list[dict]) -> tuple[float, dict[str, float], dict[str, float]]:
    farm = Farm(groups, threads)
    try:
        farm.warm()
        return farm.run(jobs)
    finally:
        farm.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=JOB["steps"],
                        help="denoising steps a job (the render's share of its CPU work)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the bare loop and of the one group")
    args = parser.parse_args()
    jobs = [dict(job, steps=args.steps) for job in requests(args.jobs)]
    from workers.ray_cluster import quiet_ray_env

    quiet_ray_env()
    bare_s = bare_loop(jobs, args.threads)
    one_s, one_duty, one_cpu = timed_farm(1, args.threads, jobs)
    two_s, two_duty, two_cpu = timed_farm(2, max(1, CORES // 2), jobs)
    n = len(jobs)
    print(f"{n} toy jobs ({JOB['frames']} frames, {args.steps} steps, "
          f"{JOB['width']}x{JOB['height']}), {CORES} cores, bare and 1 group on "
          f"{args.threads} thread(s), 2 groups on {max(1, CORES // 2)} each")
    print(f"{'run':28s} {'seconds':>8s} {'jobs/min':>9s}  duty per group")
    for name, secs, duty in (("bare loop (1 process)", bare_s, {}),
                             ("farm, 1 group", one_s, one_duty),
                             ("farm, 2 groups", two_s, two_duty)):
        shown = ", ".join(f"{g.rsplit(':', 1)[-1]} {d:.2f}" for g, d in duty.items())
        print(f"{name:28s} {secs:8.2f} {60 * n / secs:9.2f}  {shown}")
    print_cpu(n, {"1 group": one_cpu, "2 groups": two_cpu})
    print(f"farm (1 group) / bare time: {one_s / bare_s:.2f} (target <= 1.15)")
    print(f"min duty: {min([*one_duty.values(), *two_duty.values()]):.2f} (target >= 0.90)")
    print(f"jobs per minute, 2 groups / 1 group: {one_s / two_s:.2f} (target >= 1.6)")


def print_cpu(n: int, runs: dict[str, dict[str, float]]) -> None:
    """CPU seconds a job per role, and the work outside the actors as a share of theirs: on
    these cores, jobs finish at most cores / (1 + share) x as fast as one actor renders them."""
    roles = sorted({role for cpu in runs.values() for role in cpu})
    print(f"{'CPU seconds a job':28s} " + " ".join(f"{name:>9s}" for name in runs))
    for role in roles:
        print(f"{role:28s} " + " ".join(f"{cpu.get(role, 0.0) / n:9.3f}"
                                        for cpu in runs.values()))
    for name, cpu in runs.items():
        render = cpu.get(proc_cpu.RENDER, 0.0)
        if render <= 0:
            raise RuntimeError(f"{name}: no CPU time of a render actor among {sorted(cpu)}")
        share = (sum(cpu.values()) - render) / render
        print(f"{name}: work outside the actors = {share:.2f} x theirs; "
              f"the cores allow at most {CORES / (1 + share):.2f}x one actor's rate")


if __name__ == "__main__":
    main()
