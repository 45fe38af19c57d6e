"""CPU seconds per role of the farm's processes, read from /proc (Linux only).

A snapshot maps each live process to (role, CPU seconds): its own user + system time plus
that of the children it has reaped (an ffmpeg that a Celery driver ran and waited for lands
in the driver's). ``cpu_by_role(before, after)`` sums the difference per role; a process
that started between the snapshots counts whole, one that ended is lost (short-lived ones
are reaped by a process that is still there, so their time is not).
"""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")  # clock ticks per second of /proc/<pid>/stat's times

# (role, what the command line contains), first match wins.
ROLES = (
    ("actor (render)", "ray::"),
    ("render driver (Celery)", "render."),
    ("stitch worker (Celery)", "-Q stitch"),
    ("beat (ticks)", " beat"),
    ("PostgreSQL", "postgres"),
    ("Redis", "redis-server"),
    ("Ray services", "ray"),
)


def _role(cmdline: str) -> str | None:
    return next((role for role, needle in ROLES if needle in cmdline), None)


def snapshot() -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) for every process with a known role."""
    seen = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            # Fields after the command name's closing parenthesis: utime is the 14th of the
            # whole line, so index 11 here; stime, cutime, cstime follow.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while we looked
            continue
        role = _role(cmdline)
        if role is not None:
            seen[int(entry.name)] = (role, sum(int(f) for f in fields[11:15]) / TICKS)
    return seen


def cpu_by_role(before: dict[int, tuple[str, float]],
                after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each role spent between two snapshots."""
    spent: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        spent[role] = spent.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
    return spent
