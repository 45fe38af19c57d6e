"""CPU seconds per role of one farm's processes, read from /proc (Linux only).

A snapshot maps each of the farm's live processes to (role, CPU seconds): its own user +
system time plus that of the children it has reaped (an ffmpeg that a Celery driver ran
and waited for lands in the driver's). The farm's processes are those of the given
sessions (the benchmark starts each service with ``start_new_session``; Ray's raylet and
actors stay in the head's session), the PostgreSQL backends of its database, and the Redis
server (shared with whatever else uses it). ``cpu_by_role(before, after)`` sums the
difference per role. A process that ended between the snapshots, reaped by a parent that
is counted too, is in that parent's children's time whole: what it had spent before the
first snapshot is subtracted. One reaped by a parent not counted is lost.
"""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")  # clock ticks per second of /proc/<pid>/stat's times
RENDER = "actor (render)"

# (role, what the command line contains), first match wins. Ray names an actor's process
# ray::<class>[.<method>]; its agents and idle workers are ray::<other names>.
ROLES = (
    (RENDER, "ray::RenderWorker"),
    ("render driver (Celery)", "-Q render."),
    ("stitch worker (Celery)", "-Q stitch"),
    ("beat (ticks)", " beat"),
    ("PostgreSQL", "postgres"),
    ("Redis", "redis-server"),
    ("Ray services", "ray"),
)

Snapshot = dict[int, tuple[str, float, int]]  # pid -> (role, CPU seconds, parent pid)


def _role(cmdline: str) -> str | None:
    return next((role for role, needle in ROLES if needle in cmdline), None)


def snapshot(sessions: set[int], database: str) -> Snapshot:
    """The farm's processes (see the module's text) and their CPU seconds so far."""
    seen = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            # Fields after the command name's closing parenthesis: the parent is the 4th of
            # the whole line (index 1 here), the session the 6th (index 3), utime the 14th
            # (index 11); stime, cutime and cstime follow it.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while we looked
            continue
        ours = (int(fields[3]) in sessions or "redis-server" in cmdline
                or (cmdline.startswith("postgres:") and database in cmdline))
        role = _role(cmdline) if ours else None
        if role is not None:
            seen[int(entry.name)] = (role, sum(int(f) for f in fields[11:15]) / TICKS,
                                     int(fields[1]))
    return seen


def cpu_by_role(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds each role spent between two snapshots."""
    spent: dict[str, float] = {}
    for pid, (role, seconds, _) in after.items():
        spent[role] = spent.get(role, 0.0) + seconds - before.get(pid, (role, 0.0, 0))[1]
    for pid, (role, seconds, parent) in before.items():
        if pid not in after and parent in after:  # in its parent's children's time whole
            spent[role] = spent.get(role, 0.0) - seconds
    return spent
