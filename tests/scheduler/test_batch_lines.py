import json
import pickle

import pytest

from scheduler.batch_lines import MAX_BATCH_JOBS, BatchFileError, BatchLine, parse_batch


def jsonl(*rows) -> str:
    return "\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n"


def raises(content, fmt="jsonl", defaults=None) -> BatchFileError:
    with pytest.raises(BatchFileError) as caught:
        parse_batch(content, fmt, defaults)
    return caught.value


# --- happy paths --------------------------------------------------------------------------

def test_jsonl_lines_with_overrides_and_defaults():
    content = jsonl({"prompt": "a cat", "frames": 33}, "", "   ",
                    {"prompt": "a dog", "model": "wan-toy", "seed": 7})
    lines = parse_batch(content, "jsonl", {"model": "wan-tiny", "frames": 17})
    assert lines == [
        BatchLine(1, {"prompt": "a cat", "model": "wan-tiny", "frames": 33}),
        BatchLine(4, {"prompt": "a dog", "model": "wan-toy", "frames": 17, "seed": 7}),
    ]


def test_jsonl_keeps_unicode_line_separators_inside_strings():
    content = '{"prompt": "one\u2028two"}\r\n{"prompt": "three"}\r\n'
    assert [line.fields["prompt"] for line in parse_batch(content, "jsonl")] == \
        ["one\u2028two", "three"]


def test_csv_rows_with_overrides_defaults_and_empty_cells():
    content = "prompt,model,frames,seed\na cat,,33,\n\n\"a dog, running\",wan-toy,, 5\n"
    lines = parse_batch(content, "csv", {"model": "wan-tiny"})
    assert lines == [
        BatchLine(2, {"prompt": "a cat", "model": "wan-tiny", "frames": "33"}),
        BatchLine(4, {"prompt": "a dog, running", "model": "wan-toy", "seed": " 5"}),
    ]


def test_csv_line_numbers_count_the_physical_lines_of_quoted_cells():
    content = 'prompt\n"two\nlines"\nnext\n'
    assert [(line.line, line.fields["prompt"]) for line in parse_batch(content, "csv")] == \
        [(2, "two\nlines"), (4, "next")]


def test_csv_bom_is_stripped():
    content = "\ufeffprompt,seed\r\na cat,3\r\n"
    assert parse_batch(content, "csv") == [BatchLine(2, {"prompt": "a cat", "seed": "3"})]


def test_jsonl_bom_is_stripped():
    assert parse_batch("\ufeff" + jsonl({"prompt": "x"}), "jsonl") == [BatchLine(1, {"prompt": "x"})]


def test_returned_fields_are_independent_copies():
    defaults = {"model": "wan-tiny"}
    lines = parse_batch(jsonl({"prompt": "x", "seeds": 2}), "jsonl", defaults)
    lines[0].fields["model"] = "changed"
    assert lines[1].fields["model"] == "wan-tiny" and defaults == {"model": "wan-tiny"}


# --- seed fan-out -------------------------------------------------------------------------

def seeds_of(lines):
    return [(line.line, line.fields.get("seed")) for line in lines]


def test_fan_out_by_count_starts_at_zero_without_a_seed():
    lines = parse_batch(jsonl({"prompt": "x", "seeds": 3}), "jsonl")
    assert seeds_of(lines) == [(1, 0), (1, 1), (1, 2)]
    assert all("seeds" not in line.fields for line in lines)


def test_fan_out_by_count_from_a_base_seed():
    content = jsonl({"prompt": "x", "seeds": 3, "seed": 100}, {"prompt": "y"})
    assert seeds_of(parse_batch(content, "jsonl")) == [(1, 100), (1, 101), (1, 102), (2, None)]


def test_csv_fan_out_by_count_coerces_the_base_seed():
    lines = parse_batch("prompt,seed,seeds\nx,40,2\ny,,2\n", "csv")
    assert seeds_of(lines) == [(2, 40), (2, 41), (3, 0), (3, 1)]


def test_fan_out_by_jsonl_list():
    lines = parse_batch(jsonl({"prompt": "x", "seeds": [9, 1, 5], "seed": 3}), "jsonl")
    assert seeds_of(lines) == [(1, 9), (1, 1), (1, 5)]


@pytest.mark.parametrize("cell", ["1;5;9", "1 5 9", " 1 ; 5 ;9 ", "1;5;9;"])
def test_fan_out_by_csv_list(cell):
    lines = parse_batch(f"prompt,seeds\nx,{cell}\n", "csv")
    assert seeds_of(lines) == [(2, 1), (2, 5), (2, 9)]


def test_seeds_from_defaults_and_null_switches_them_off():
    content = jsonl({"prompt": "x"}, {"prompt": "y", "seeds": None}, {"prompt": "z", "seeds": 1})
    lines = parse_batch(content, "jsonl", {"seeds": 2, "seed": 10})
    assert seeds_of(lines) == [(1, 10), (1, 11), (2, 10), (3, 10)]
    assert "seeds" not in lines[2].fields


# --- errors -------------------------------------------------------------------------------

def test_error_string_and_attributes():
    error = BatchFileError(3, "seeds", "x", "bad")
    assert str(error) == "line 3: seeds: got 'x': bad"
    assert (error.line, error.field, error.value, error.message) == (3, "seeds", "x", "bad")
    assert str(BatchFileError(None, None, None, "bad")) == "bad"
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.line, copy.value) == (str(error), 3, "x")


def test_long_values_are_shortened_in_the_message():
    error = BatchFileError(1, None, "x" * 500, "bad")
    assert len(str(error)) < 120 and error.value == "x" * 500


def test_unknown_format():
    error = raises("prompt\nx\n", fmt="xlsx")
    assert (error.line, error.field, error.value) == (None, "format", "xlsx")
    assert "'xlsx'" in str(error)


def test_invalid_json_names_the_line():
    error = raises(jsonl({"prompt": "x"}, '{"prompt": "y",'))
    assert (error.line, error.field) == (2, None)
    assert str(error).startswith("line 2: got '{\"prompt\": \"y\",': invalid JSON: ")


@pytest.mark.parametrize("row", ['["prompt"]', '"a cat"', "7", "null"])
def test_jsonl_line_must_be_an_object(row):
    error = raises(jsonl({"prompt": "x"}, row))
    assert (error.line, error.field, error.value) == (2, None, json.loads(row))
    assert "line 2" in str(error) and "expected a JSON object" in str(error)


@pytest.mark.parametrize("content,fmt,line,value", [
    (jsonl({"prompt": "x"}, {"model": "wan-tiny"}), "jsonl", 2, None),
    (jsonl({"prompt": ""}), "jsonl", 1, ""),
    (jsonl({"prompt": "   "}), "jsonl", 1, "   "),
    (jsonl({"prompt": 5}), "jsonl", 1, 5),
    ("prompt,model\nx,a\n,b\n", "csv", 3, None),
])
def test_every_line_needs_a_prompt(content, fmt, line, value):
    error = raises(content, fmt)
    assert (error.line, error.field, error.value) == (line, "prompt", value)
    assert str(error).startswith(f"line {line}: prompt: ")
    if value is not None:
        assert f"got {value!r}" in str(error)


def test_a_default_prompt_does_not_stand_in_for_a_missing_one():
    assert raises(jsonl({"model": "m"}), defaults={"prompt": "x"}).field == "prompt"


@pytest.mark.parametrize("header,field,value,message", [
    ("model,seed", "header", ["model", "seed"], "has no 'prompt' column"),
    ("prompt,seed,prompt", "header", "prompt", "duplicate column name"),
    ("prompt, seed,seed ", "header", "seed", "duplicate column name"),
    ("prompt,,seed", "header", ["prompt", "", "seed"], "column 2 has no name"),
])
def test_csv_header_errors(header, field, value, message):
    error = raises(f"{header}\nx,1,2\n", "csv")
    assert (error.line, error.field, error.value) == (1, field, value)
    assert str(error) == f"line 1: {field}: got {value!r}: {message}"


def test_csv_header_line_number_skips_leading_blank_lines():
    assert raises("\n\nmodel\nx\n", "csv").line == 3


def test_csv_row_with_more_cells_than_the_header():
    error = raises("prompt,seed\nx,1\ny,2,oops\n", "csv")
    assert (error.line, error.field, error.value) == (3, None, ["oops"])
    assert "'oops'" in str(error)
    assert parse_batch("prompt,seed\nx,1,,\n", "csv") == [BatchLine(2, {"prompt": "x", "seed": "1"})]


@pytest.mark.parametrize("seeds", [0, -2, "0", "two", 1.5, True, "", [], [1, "x"], [1, 2.0],
                                   {"n": 2}, MAX_BATCH_JOBS + 1, list(range(MAX_BATCH_JOBS + 1))])
def test_bad_seeds_in_jsonl(seeds):
    error = raises(jsonl({"prompt": "ok"}, {"prompt": "x", "seeds": seeds}))
    assert (error.line, error.field, error.value) == (2, "seeds", seeds)
    assert str(error).startswith(f"line 2: seeds: got {repr(seeds)[:20]}")


@pytest.mark.parametrize("cell", ["x", "1;x;3", ";", "-1", "2.5"])
def test_bad_seeds_in_csv_quote_the_cell(cell):
    error = raises(f"prompt,seeds\nok,1\nx,{cell}\n", "csv")
    assert (error.line, error.field, error.value) == (3, "seeds", cell)
    assert f"got {cell!r}" in str(error)


def test_bad_seeds_in_defaults_name_the_first_line():
    error = raises(jsonl({"prompt": "x"}), defaults={"seeds": "many"})
    assert (error.line, error.field, error.value) == (1, "seeds", "many")


def test_base_seed_must_be_an_integer_when_fanning_out():
    error = raises("prompt,seed,seeds\nx,abc,2\n", "csv")
    assert (error.line, error.field, error.value) == (2, "seed", "abc")
    assert "got 'abc'" in str(error)
    # without fan-out the seed is passed on as given, for the job schema to judge
    assert parse_batch("prompt,seed\nx,abc\n", "csv")[0].fields["seed"] == "abc"


@pytest.mark.parametrize("content,fmt", [
    ("", "jsonl"), ("\n  \n", "jsonl"), ("", "csv"), ("prompt,seed\n", "csv"), ("\ufeff", "csv"),
])
def test_empty_batch_is_an_error(content, fmt):
    error = raises(content, fmt)
    assert (error.line, error.field, error.value) == (None, "content", 0)


def test_job_cap_counts_the_fan_out():
    at_cap = jsonl(*[{"prompt": f"p{i}", "seeds": 1000} for i in range(10)])
    assert len(parse_batch(at_cap, "jsonl")) == MAX_BATCH_JOBS
    error = raises(at_cap + jsonl({"prompt": "one more"}))
    assert (error.line, error.field, error.value) == (None, "content", MAX_BATCH_JOBS + 1)
    assert str(error) == "content: got 10001: expands to 10001 jobs; at most 10000"


def test_job_cap_does_not_build_every_job_first():
    huge = jsonl(*[{"prompt": "x", "seeds": MAX_BATCH_JOBS} for _ in range(1000)])
    assert raises(huge).value == 1000 * MAX_BATCH_JOBS


def test_defaults_must_be_a_dict():
    error = raises(jsonl({"prompt": "x"}), defaults=["seeds"])
    assert (error.field, error.value) == ("defaults", ["seeds"])
