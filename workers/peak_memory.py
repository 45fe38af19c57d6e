"""Peak memory of one render on an actor (issue #13: a job's ``peak_memory_bytes``).

On a GPU: torch's peak of allocated device memory since the render began. On a CPU: the
actor process's peak resident set since the render began (Linux: VmHWM, reset by writing
5 to /proc/self/clear_refs); where that cannot be reset, the process's lifetime peak
(getrusage ru_maxrss). An actor renders one request at a time, so the peak is the render's.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
    except OSError:  # not Linux, or not allowed: the lifetime peak is reported
        pass


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # the file says kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
