"""How often a render's stream reports its denoising steps (issue #11: the farm's overhead).

Every event of a render's stream is an object Ray serializes, stores and reports to the
driver, which unpacks it, beside a fast model's steps on the same cores. A driver writes
progress at most every 0.25 s anyway, so a request may ask for at most one progress event
every ``progress_every_s`` seconds; the others are held back, and the latest one held goes
out before any other event, so the stream still shows its last step before its frames, its
handover or its end. A request without the field reports every step.
"""

from __future__ import annotations

from collections.abc import Iterator

FIELD = "progress_every_s"  # in a render request; the pipeline never sees it


def pace(request: dict) -> float:
    """The request's seconds between progress events (0: every step)."""
    given = request.get(FIELD)
    try:
        seconds = float(given or 0.0)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not seconds >= 0:  # NaN too
        raise ValueError(f"{FIELD} must be a number of seconds >= 0, got {given!r}")
    return seconds


def without_pace(request: dict) -> dict:
    return {k: v for k, v in request.items() if k != FIELD}


def paced(events: Iterator[dict], every_s: float) -> Iterator[dict]:
    """``events`` with progress events thinned to one per ``every_s`` of their own ``at``
    clock; any other event first flushes the progress event held back, as does the end."""
    held, sent_at = None, None
    for event in events:
        if event["kind"] != "progress":
            if held is not None:
                yield held
                held = None
            yield event
        elif every_s <= 0 or sent_at is None or event["at"] - sent_at >= every_s:
            held, sent_at = None, event["at"]
            yield event
        else:
            held = event
    if held is not None:
        yield held
