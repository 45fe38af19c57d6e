"""Daily time windows in which a batch may run, e.g. "22:00-06:00" in "Europe/Paris".

A window is wall-clock time in an IANA time zone, so it follows daylight saving time. It is
open on [start, end); an end before the start means the window crosses midnight.
Instants are compared in UTC: aware datetimes that share a tzinfo compare by wall clock,
which is wrong across a DST fall-back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_CLOCK = r"(\d{2}):(\d{2})(?::(\d{2}))?"  # HH:MM or HH:MM:SS
_WINDOW_RE = re.compile(rf"\s*{_CLOCK}\s*-\s*{_CLOCK}\s*")
_FORMAT_HINT = "expected 'HH:MM-HH:MM' or 'HH:MM:SS-HH:MM:SS' (24-hour)"
_DAYS_AHEAD = 3  # the next start or end is at most ~25 hours away; 3 days is ample


class WindowError(ValueError):
    """A window's text, times or time zone is invalid."""


def _zone(tz: str) -> ZoneInfo:
    if not isinstance(tz, str):
        raise WindowError(f"timezone {tz!r}: expected an IANA time zone name")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise WindowError(f"timezone {tz!r}: unknown IANA time zone") from None


def _clock(text: str, hour: str, minute: str, second: str | None) -> time:
    parts = (("hour", hour, 23), ("minute", minute, 59), ("second", second or "0", 59))
    for name, digits, top in parts:
        if int(digits) > top:
            raise WindowError(f"window {text!r}: {name} {int(digits)} is not 0..{top}")
    return time(int(hour), int(minute), int(second or 0))


def _format_clock(t: time) -> str:
    return t.strftime("%H:%M:%S" if t.second else "%H:%M")


def _require_aware(now: datetime) -> None:
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now {now!r}: expected a timezone-aware datetime")


@dataclass(frozen=True)
class Window:
    start: time
    end: time
    tz: str = "UTC"  # IANA name, e.g. "Europe/Paris"

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if not isinstance(value, time) or value.tzinfo is not None:
                raise WindowError(f"{name} {value!r}: expected a datetime.time without tzinfo")
        if self.start == self.end:
            raise WindowError(f"window {self._span()!r}: empty (start equals end)")
        _zone(self.tz)

    @classmethod
    def parse(cls, text: str, tz: str = "UTC") -> Window:
        match = _WINDOW_RE.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise WindowError(f"window {text!r}: {_FORMAT_HINT}")
        start = _clock(text, *match.group(1, 2, 3))
        end = _clock(text, *match.group(4, 5, 6))
        if start == end:
            raise WindowError(f"window {text!r}: empty (start equals end)")
        return cls(start, end, tz)

    @property
    def zone(self) -> ZoneInfo:
        return _zone(self.tz)  # ZoneInfo caches instances by key

    @property
    def crosses_midnight(self) -> bool:
        return self.end < self.start

    def is_open(self, now: datetime) -> bool:
        _require_aware(now)
        clock = now.astimezone(self.zone).time()
        if self.crosses_midnight:
            return clock >= self.start or clock < self.end
        return self.start <= clock < self.end

    def next_open(self, now: datetime) -> datetime:
        """`now` if open, else the next instant the window opens (in the window's zone)."""
        if self.is_open(now):
            return now
        return self._next_occurrence(self.start, now)

    def closes_at(self, now: datetime) -> datetime:
        """End of the current opening if open at `now`, else end of the next opening."""
        return self._next_occurrence(self.end, self.next_open(now))

    def _next_occurrence(self, clock: time, after: datetime) -> datetime:
        """First instant strictly after `after` at which the local wall clock reads `clock`.

        Both folds are tried so that a fall-back hour that repeats counts twice; a wall time
        that DST skips resolves as zoneinfo does with fold=0.
        """
        after_utc = after.astimezone(timezone.utc)
        today = after.astimezone(self.zone).date()
        for days in range(_DAYS_AHEAD):
            moment = datetime.combine(today + timedelta(days=days), clock, tzinfo=self.zone)
            for fold in (0, 1):
                candidate = moment.replace(fold=fold)
                if candidate.astimezone(timezone.utc) > after_utc:
                    return candidate
        raise AssertionError(f"window {str(self)!r}: no {clock} within {_DAYS_AHEAD} days")

    def _span(self) -> str:
        return f"{_format_clock(self.start)}-{_format_clock(self.end)}"

    def __str__(self) -> str:
        return f"{self._span()} {self.tz}"
