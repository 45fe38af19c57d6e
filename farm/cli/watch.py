"""`farm wait` and `farm batch wait` (issue #13, item 4): follow the API's server-sent events
with one live progress bar per segment (per batch: jobs ended of all). Against an API
without the stream routes (a 404 from the route itself) the caller falls back to polling.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

NO_STREAM = object()  # the API has no stream route: poll instead
RECONNECT_S = 1.0  # after a dropped stream (an API restart), connect again this soon
FINAL = {"succeeded", "failed", "canceled", "expired", "deleted"}


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """(event, data) of each server-sent event; comment lines (pings) are skipped."""
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


def _stream_once(http: httpx.Client, path: str, on_event: Callable[[str, dict], bool],
                 deadline: float):
    """Read one stream until ``on_event`` says done (True), the deadline passes (False), the
    route is missing (NO_STREAM), or the connection drops (None: connect again)."""
    timeout = httpx.Timeout(30.0, read=60.0)  # the server pings every 10 s
    try:
        with http.stream("GET", path, timeout=timeout) as resp:
            if resp.status_code >= 400:
                resp.read()
                return resp
            for event, data in parse_sse(resp.iter_lines()):
                if on_event(event, data):
                    return True
                if time.monotonic() > deadline:
                    return False
    except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout):
        pass
    return None if time.monotonic() <= deadline else False


def follow(http: httpx.Client, path: str, on_event: Callable[[str, dict], bool],
           deadline: float):
    """True: the stream said done; False: the deadline passed; NO_STREAM: fall back to
    polling; an httpx.Response: the route's error (403, 404 of an unknown id)."""
    while True:
        result = _stream_once(http, path, on_event, deadline)
        if isinstance(result, httpx.Response):
            try:
                detail = result.json().get("detail")
            except ValueError:
                detail = None
            # FastAPI's own 404 for a path it does not serve, not "no job with id ..."
            unknown_route = result.status_code == 404 and detail == "Not Found"
            return NO_STREAM if unknown_route else result
        if result is not None:
            return result
        time.sleep(RECONNECT_S)


def _bars() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[note]}"), TimeElapsedColumn())


def wait_job(http: httpx.Client, job_id: str, deadline: float):
    """Follow a job's stream with a bar per segment; -> (follow's result, the last
    ``done`` or ``state`` event's data)."""
    last: dict = {"id": job_id, "state": "unknown", "error": None, "output_url": None}
    with _bars() as bars:
        tasks: dict[int, int] = {}
        header = bars.add_task(f"{job_id[:8]}", total=None, note="connecting")

        def on_event(event: str, data: dict) -> bool:
            if event == "state":
                last.update(data)
                bars.update(header, note=data["state"])
            elif event == "queue":
                where = f"#{data['queue_position']} in queue" if data["queue_position"] else ""
                eta = f"eta {data['eta_s']} s" if data["eta_s"] is not None else ""
                bars.update(header, note=" ".join(x for x in (last["state"], where, eta) if x))
            elif event == "deadline":  # issue #15: the farm's deadline watch
                standing = ("deadline MISSED" if data["deadline_missed_at"] else
                            "deadline AT RISK" if data["deadline_risk"] else "deadline on track")
                bars.update(header, note=f"{last['state']} {standing}")
            elif event == "progress":
                index = data["index"]
                if index not in tasks:
                    tasks[index] = bars.add_task(f"  segment {index}", total=data["steps"],
                                                 note="")
                bars.update(tasks[index], completed=data["step"], total=data["steps"],
                            note=data["state"])
            elif event == "done":
                last.update(data)
                bars.update(header, note=data["state"])
                return True
            return False

        return follow(http, f"/v1/jobs/{job_id}/stream", on_event, deadline), last


def wait_batch(http: httpx.Client, batch_id: str, deadline: float):
    """Follow a batch's stream with one bar of its jobs ended; -> (result, last counts)."""
    last: dict = {"counts": {}, "jobs": 0}
    with _bars() as bars:
        bar = bars.add_task(f"batch {batch_id[:8]}", total=None, note="connecting")

        def on_event(event: str, data: dict) -> bool:
            if event in ("counts", "done"):
                last.update(data)
                ended = sum(n for state, n in data["counts"].items() if state in FINAL)
                note = " ".join(f"{state} {n}" for state, n in sorted(data["counts"].items()))
                bars.update(bar, completed=ended, total=last["jobs"] or None, note=note)
            return event == "done"

        return follow(http, f"/v1/batches/{batch_id}/stream", on_event, deadline), last
