from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from scheduler.windows import Window, WindowError

UTC = timezone.utc
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize("text,start,end", [
    ("22:00-06:00", time(22), time(6)),
    ("22:00 - 06:00", time(22), time(6)),
    ("  09:30-17:45 ", time(9, 30), time(17, 45)),
    ("12:00:05-12:00:10", time(12, 0, 5), time(12, 0, 10)),
    ("00:00-23:59:59", time(0), time(23, 59, 59)),
])
def test_parse_accepts_minutes_and_seconds(text, start, end):
    window = Window.parse(text)
    assert (window.start, window.end, window.tz) == (start, end, "UTC")


def test_str_shows_zone_and_seconds_only_when_non_zero():
    assert str(Window.parse("22:00-06:00", "Europe/Paris")) == "22:00-06:00 Europe/Paris"
    assert str(Window.parse("12:00:05 - 12:00:10")) == "12:00:05-12:00:10 UTC"
    assert str(Window.parse("12:00:00-12:00:10")) == "12:00-12:00:10 UTC"


@pytest.mark.parametrize("text,message", [
    ("25:00-06:00", "window '25:00-06:00': hour 25 is not 0..23"),
    ("24:00-06:00", "window '24:00-06:00': hour 24 is not 0..23"),
    ("22:60-06:00", "window '22:60-06:00': minute 60 is not 0..59"),
    ("22:00-06:00:75", "window '22:00-06:00:75': second 75 is not 0..59"),
    ("10:00-10:00", "window '10:00-10:00': empty (start equals end)"),
    ("10:00 - 10:00:00", "window '10:00 - 10:00:00': empty (start equals end)"),
    ("22-06", "window '22-06': expected"),
    ("9:00-17:00", "window '9:00-17:00': expected"),
    ("22:00", "window '22:00': expected"),
    ("", "window '': expected"),
])
def test_parse_rejects_bad_text_quoting_it(text, message):
    with pytest.raises(WindowError) as caught:
        Window.parse(text)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize("tz", ["Mars/Base", "", "../etc/passwd", "America"])
def test_unknown_time_zone_is_quoted(tz):
    with pytest.raises(WindowError, match="unknown IANA time zone") as caught:
        Window.parse("22:00-06:00", tz)
    assert str(caught.value).startswith(f"timezone {tz!r}: ")


def test_window_error_is_a_value_error():
    assert issubclass(WindowError, ValueError)


def test_direct_construction_is_checked_too():
    with pytest.raises(WindowError, match="window '10:00-10:00': empty"):
        Window(time(10), time(10))
    with pytest.raises(WindowError, match="timezone 'Mars/Base'"):
        Window(time(10), time(11), "Mars/Base")


def test_naive_now_is_rejected():
    window = Window.parse("22:00-06:00")
    naive = datetime(2026, 1, 1, 23)
    for method in (window.is_open, window.next_open, window.closes_at):
        with pytest.raises(ValueError, match=r"now datetime\.datetime\(2026, 1, 1, 23, 0\)"):
            method(naive)


@pytest.mark.parametrize("instant,is_open", [
    (utc(2026, 1, 1, 22), True),  # exactly at start
    (utc(2026, 1, 1, 23), True),
    (utc(2026, 1, 2, 0), True),
    (utc(2026, 1, 2, 5, 59, 59), True),
    (utc(2026, 1, 2, 6), False),  # exactly at end
    (utc(2026, 1, 2, 12), False),
    (utc(2026, 1, 2, 21, 59), False),
])
def test_midnight_crossing_window(instant, is_open):
    assert Window.parse("22:00-06:00").is_open(instant) is is_open


@pytest.mark.parametrize("instant,is_open", [
    (utc(2026, 1, 1, 8, 59, 59), False),
    (utc(2026, 1, 1, 9), True),
    (utc(2026, 1, 1, 16, 59, 59), True),
    (utc(2026, 1, 1, 17), False),
    (utc(2026, 1, 1, 23), False),
])
def test_same_day_window(instant, is_open):
    assert Window.parse("09:00-17:00").is_open(instant) is is_open


@pytest.mark.parametrize("now,opens,closes", [
    (utc(2026, 1, 1, 23), utc(2026, 1, 1, 23), utc(2026, 1, 2, 6)),  # open before midnight
    (utc(2026, 1, 2, 5), utc(2026, 1, 2, 5), utc(2026, 1, 2, 6)),  # open after midnight
    (utc(2026, 1, 2, 6), utc(2026, 1, 2, 22), utc(2026, 1, 3, 6)),  # closed at end
    (utc(2026, 1, 2, 12), utc(2026, 1, 2, 22), utc(2026, 1, 3, 6)),
])
def test_next_open_and_closes_at_across_midnight(now, opens, closes):
    window = Window.parse("22:00-06:00")
    assert window.next_open(now) == opens
    assert window.closes_at(now) == closes


@pytest.mark.parametrize("now,opens,closes", [
    (utc(2026, 1, 1, 8), utc(2026, 1, 1, 9), utc(2026, 1, 1, 17)),  # before today's opening
    (utc(2026, 1, 1, 9), utc(2026, 1, 1, 9), utc(2026, 1, 1, 17)),  # at start
    (utc(2026, 1, 1, 12), utc(2026, 1, 1, 12), utc(2026, 1, 1, 17)),
    (utc(2026, 1, 1, 17), utc(2026, 1, 2, 9), utc(2026, 1, 2, 17)),  # after: tomorrow
])
def test_next_open_and_closes_at_same_day(now, opens, closes):
    window = Window.parse("09:00-17:00")
    assert window.next_open(now) == opens
    assert window.closes_at(now) == closes


def test_next_open_is_now_itself_when_open():
    now = utc(2026, 1, 1, 12, 30, 1, 500)
    assert Window.parse("09:00-17:00").next_open(now) is now


def test_results_are_in_the_window_zone():
    window = Window.parse("09:00-17:00", "Europe/Paris")
    opens = window.next_open(utc(2026, 1, 1, 20))
    assert opens.tzinfo == ZoneInfo("Europe/Paris")
    assert (opens.date(), opens.time()) == (datetime(2026, 1, 2).date(), time(9))
    assert opens == utc(2026, 1, 2, 8)  # CET is UTC+1 in winter


def test_new_york_window_follows_dst_when_asked_in_utc():
    # US DST starts 2026-03-08 at 02:00 local: EST (UTC-5) before, EDT (UTC-4) after.
    window = Window.parse("22:00-06:00", "America/New_York")
    before = window.next_open(utc(2026, 3, 7, 12))
    after = window.next_open(utc(2026, 3, 9, 12))
    assert before == utc(2026, 3, 8, 3)  # 22:00 EST
    assert after == utc(2026, 3, 10, 2)  # 22:00 EDT
    assert before.utcoffset() == timedelta(hours=-5)
    assert after.utcoffset() == timedelta(hours=-4)
    assert before.utcoffset() != after.utcoffset()
    # The night of the change opens at 22:00 EST and closes at 06:00 EDT: 7 hours.
    assert window.closes_at(utc(2026, 3, 7, 12)) == utc(2026, 3, 8, 10)
    assert window.is_open(utc(2026, 3, 8, 3)) and not window.is_open(utc(2026, 3, 8, 2, 59))
    assert window.is_open(utc(2026, 3, 8, 9, 59)) and not window.is_open(utc(2026, 3, 8, 10))


def test_repeated_fall_back_hour_opens_twice():
    # 2026-11-01 01:00-02:00 happens twice in New York: EDT (05:xx UTC), then EST (06:xx UTC).
    window = Window.parse("01:15-01:30", "America/New_York")
    first_pass_after_close = datetime(2026, 11, 1, 1, 40, tzinfo=NEW_YORK)  # fold=0: EDT
    assert not window.is_open(first_pass_after_close)
    # Times in a fold never equal another zone's (PEP 495), so compare in UTC.
    opens = window.next_open(first_pass_after_close)
    assert (opens.time(), opens.fold) == (time(1, 15), 1)
    assert opens.astimezone(UTC) == utc(2026, 11, 1, 6, 15)
    assert window.closes_at(first_pass_after_close).astimezone(UTC) == utc(2026, 11, 1, 6, 30)
    second_pass = datetime(2026, 11, 1, 1, 20, fold=1, tzinfo=NEW_YORK)  # EST
    assert window.is_open(second_pass)
    assert window.closes_at(second_pass).astimezone(UTC) == utc(2026, 11, 1, 6, 30)


def test_seconds_granularity_window():
    window = Window.parse("12:00:05-12:00:10")
    assert not window.is_open(utc(2026, 5, 1, 12, 0, 4))
    assert window.is_open(utc(2026, 5, 1, 12, 0, 5))
    assert window.is_open(utc(2026, 5, 1, 12, 0, 9, 999_999))
    assert not window.is_open(utc(2026, 5, 1, 12, 0, 10))
    assert window.next_open(utc(2026, 5, 1, 12)) == utc(2026, 5, 1, 12, 0, 5)
    assert window.closes_at(utc(2026, 5, 1, 12)) == utc(2026, 5, 1, 12, 0, 10)
    assert window.next_open(utc(2026, 5, 1, 12, 0, 10)) == utc(2026, 5, 2, 12, 0, 5)
