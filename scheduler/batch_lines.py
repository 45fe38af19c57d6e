"""Parse a batch file (JSONL or CSV) of prompts into one field dict per job.

Each line gives a "prompt" and may override job fields; defaults apply under every line.
A line's "seeds" fans it out: an integer N gives seeds base .. base+N-1 (base is "seed",
else 0), a list gives one job per seed (CSV writes a list as "1;5;9" or "1 5 9").
Only parsing and expansion happen here; each job's fields are validated elsewhere.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass

MAX_BATCH_JOBS = 10_000
FORMATS = ("jsonl", "csv")
_BOM = "\ufeff"
_INTEGER_RE = re.compile(r"[+-]?\d+")
_SEED_LIST_SEPARATORS = re.compile(r"[;\s]+")
_QUOTE_LIMIT = 80  # characters of a bad value's repr shown in a message


@dataclass(frozen=True)
class BatchLine:
    line: int  # 1-based line in the file (CSV: header is line 1, first data row line 2)
    fields: dict  # job fields for ONE job: "prompt", overrides, "seed" when fanned out


class BatchFileError(ValueError):
    """A batch file that cannot be parsed or expands to too many jobs."""

    def __init__(self, line: int | None, field: str | None, value, message: str):
        self.line, self.field, self.value, self.message = line, field, value, message
        parts = [f"line {line}" if line is not None else None, field,
                 f"got {_quote(value)}" if value is not None else None, message]
        super().__init__(": ".join(part for part in parts if part is not None))

    def __reduce__(self):  # keep pickling (e.g. through a task queue) working
        return type(self), (self.line, self.field, self.value, self.message)


def _quote(value) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTE_LIMIT else text[:_QUOTE_LIMIT - 3] + "..."


def _as_int(value) -> int | None:
    """An int, or a string holding one; None for anything else (bools, floats, words)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INTEGER_RE.fullmatch(value.strip()):
        return int(value)
    return None


# --- reading the two formats: each yields (line number, fields) -------------------------

def _jsonl_rows(content: str):
    # split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings
    for number, text in enumerate(content.split("\n"), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise BatchFileError(number, None, text, f"invalid JSON: {error.msg} at column {error.colno}") from None
        if not isinstance(row, dict):
            raise BatchFileError(number, None, row, "expected a JSON object")
        yield number, row


def _csv_records(content: str):
    """(first line number, cells) per non-blank record; a quoted cell may span lines."""
    reader = csv.reader(io.StringIO(content, newline=""))  # in-memory, no file access
    while True:
        number = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise BatchFileError(number, None, None, f"invalid CSV: {error}") from None
        if any(cell.strip() for cell in cells):
            yield number, cells


def _csv_header(number: int, cells: list[str]) -> list[str]:
    names = [cell.strip() for cell in cells]
    for column, name in enumerate(names, start=1):
        if not name:
            raise BatchFileError(number, "header", cells, f"column {column} has no name")
        if name in names[:column - 1]:
            raise BatchFileError(number, "header", name, "duplicate column name")
    if "prompt" not in names:
        raise BatchFileError(number, "header", cells, "has no 'prompt' column")
    return names


def _csv_rows(content: str):
    records = _csv_records(content)
    first = next(records, None)
    if first is None:
        return
    names = _csv_header(*first)
    for number, cells in records:
        extra = [cell for cell in cells[len(names):] if cell.strip()]
        if extra:
            raise BatchFileError(number, None, extra,
                                 f"{len(cells)} cells but the header names {len(names)}")
        yield number, {name: cell for name, cell in zip(names, cells) if cell.strip()}


# --- seeds --------------------------------------------------------------------------------

def _seed_list(number: int, seeds) -> list[int] | int:
    """A line's list of seeds, or its seed count (not yet resolved against a base seed)."""
    if isinstance(seeds, list):
        return _listed_seeds(number, seeds, seeds)
    if isinstance(seeds, str) and _SEED_LIST_SEPARATORS.search(seeds.strip()):
        parts = [part for part in _SEED_LIST_SEPARATORS.split(seeds) if part]
        return _listed_seeds(number, parts, seeds)  # CSV list: "1;5;9" or "1 5 9"
    count = _as_int(seeds)
    if count is None or not 1 <= count <= MAX_BATCH_JOBS:
        raise BatchFileError(number, "seeds", seeds,
                             f"expected a count 1..{MAX_BATCH_JOBS} or a list of integers")
    return count


def _listed_seeds(number: int, seeds: list, written) -> list[int]:
    """`seeds` as integers; `written` is the value as the file gave it, for messages."""
    if not seeds:
        raise BatchFileError(number, "seeds", written, "empty list of seeds")
    if len(seeds) > MAX_BATCH_JOBS:
        raise BatchFileError(number, "seeds", written,
                             f"list of {len(seeds)} seeds; at most {MAX_BATCH_JOBS}")
    parsed = [_as_int(seed) for seed in seeds]
    for seed, value in zip(seeds, parsed):
        if value is None:
            raise BatchFileError(number, "seeds", written, f"{seed!r} is not an integer")
    return parsed


def _fan_out_seeds(number: int, fields: dict) -> list[int] | range | None:
    """Pop "seeds" from `fields`; the seeds to fan out over, or None for a single job."""
    seeds = fields.pop("seeds", None)
    if seeds is None:  # absent, or null to switch off a default's fan-out
        return None
    listed = _seed_list(number, seeds)
    if not isinstance(listed, int):
        return listed
    base = _as_int(fields.get("seed", 0))
    if base is None:
        raise BatchFileError(number, "seed", fields["seed"], "base seed is not an integer")
    return range(base, base + listed)


# --- the whole file -----------------------------------------------------------------------

def _rows(content: str, fmt: str):
    if fmt not in FORMATS:
        raise BatchFileError(None, "format", fmt, "expected 'jsonl' or 'csv'")
    if not isinstance(content, str):
        raise BatchFileError(None, "content", type(content).__name__, "expected text")
    content = content.removeprefix(_BOM)
    return _jsonl_rows(content) if fmt == "jsonl" else _csv_rows(content)


def _check_prompt(number: int, row: dict) -> None:
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BatchFileError(number, "prompt", prompt, "every line needs a non-empty prompt")


def parse_batch(content: str, fmt: str, defaults: dict | None = None) -> list[BatchLine]:
    """One BatchLine per job, in file order, each line's fan-out in seed order."""
    if defaults is not None and not isinstance(defaults, dict):
        raise BatchFileError(None, "defaults", defaults, "expected a dict of job fields")
    planned = []  # (line number, fields, seeds or None); expanded once the total is known
    for number, row in _rows(content, fmt):
        _check_prompt(number, row)
        fields = {**(defaults or {}), **row}
        planned.append((number, fields, _fan_out_seeds(number, fields)))
    total = sum(1 if seeds is None else len(seeds) for _, _, seeds in planned)
    if total == 0:
        raise BatchFileError(None, "content", 0, "no job lines in the batch file")
    if total > MAX_BATCH_JOBS:
        raise BatchFileError(None, "content", total,
                             f"expands to {total} jobs; at most {MAX_BATCH_JOBS}")
    jobs = []
    for number, fields, seeds in planned:
        if seeds is None:
            jobs.append(BatchLine(number, fields))
        else:
            jobs.extend(BatchLine(number, {**fields, "seed": seed}) for seed in seeds)
    return jobs
