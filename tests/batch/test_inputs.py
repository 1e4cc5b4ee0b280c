"""Input rows: what stops a job before it starts, and what becomes one row's recorded error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visualglm.batch.inputs import InputError, folder_rows, parse_row, read_rows, scan


def _write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_scan_returns_the_ids_and_skips_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "in.jsonl", '{"id": "a", "prompt": "x"}', "", '{"id": 7, "prompt": "y"}', "  ")
    assert scan(path) == ['"a"', "7"]
    assert [row.id for row in read_rows(path)] == ["a", 7]


@pytest.mark.parametrize(("lines", "message"), [
    (['{"id": "a"}', '{"id": "a"}'], 'in.jsonl:2: duplicate id "a" (first on line 1)'),
    (['{"id": 1}', "{not json"], "in.jsonl:2: not valid JSON"),
    (['{"id": 1}', "[1, 2]"], "in.jsonl:2: a row must be a JSON object, got list"),
    (['{"prompt": "x"}'], 'in.jsonl:1: the row has no "id"'),
    (['{"id": true}'], 'in.jsonl:1: "id" must be a non-empty string or an integer, got true'),
    (['{"id": ""}'], 'in.jsonl:1: "id" must be a non-empty string'),
    (["", " "], "has no rows"),
])
def test_problems_of_the_whole_input_are_errors_before_starting(tmp_path: Path, lines, message) -> None:
    path = _write(tmp_path / "in.jsonl", *lines)
    with pytest.raises(InputError) as caught:
        scan(path)
    assert message in str(caught.value)


def test_ids_of_different_json_types_are_different_ids(tmp_path: Path) -> None:
    assert scan(_write(tmp_path / "in.jsonl", '{"id": 7}', '{"id": "7"}')) == ["7", '"7"']


def test_a_missing_or_binary_input_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        scan(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b'{"id": 1}\n\xff\xfe\n')
    with pytest.raises(InputError, match="bin.jsonl:2: not UTF-8"):
        scan(tmp_path / "bin.jsonl")


@pytest.mark.parametrize(("row", "message"), [
    ({"id": 1}, 'no "prompt"'),
    ({"id": 1, "prompt": "  "}, '"prompt" must be a non-empty string'),
    ({"id": 1, "prompt": 5}, '"prompt" must be a non-empty string'),
    ({"id": 1, "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "not both"),
    ({"id": 1, "messages": []}, "non-empty list"),
    ({"id": 1, "messages": [{"role": "assistant", "content": "y"}]}, 'expected "user"'),
    ({"id": 1, "messages": [{"role": "system", "content": "y"}]}, "system messages are not supported"),
    ({"id": 1, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "the last message must be the user's"),
    ({"id": 1, "messages": [{"role": "user", "content": 3}]}, 'string "content"'),
    ({"id": 1, "prompt": "x", "image": 3}, '"image" must be'),
    ({"id": 1, "prompt": "x", "top_k": 5.0}, '"top_k" must be an integer'),
    ({"id": 1, "prompt": "x", "temperature": "hot"}, '"temperature" must be a number'),
    ({"id": 1, "prompt": "x", "do_sample": 1}, '"do_sample" must be true or false'),
    ({"id": 1, "prompt": "x", "max_new_tokens": 0}, '"max_new_tokens" must be a positive integer'),
    ({"id": 1, "prompt": "x", "stop": [""]}, '"stop" must be'),
])
def test_problems_of_one_row_are_that_rows_error(row: dict, message: str) -> None:
    parsed = parse_row(row)
    assert parsed.error is not None and message in parsed.error, parsed.error


def test_a_conversation_becomes_history_and_the_last_question() -> None:
    row = parse_row({"id": "c", "messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                             {"role": "user", "content": "q2"}], "top_p": 0.5, "seed": 2**62 + 1,
                     "stop": "END", "label": "ignored metadata"})
    assert row.error is None
    assert (row.query, row.history) == ("q2", [("q1", "a1")])
    assert row.sampling == {"top_p": 0.5, "seed": 2**62 + 1} and row.stop == ("END",)


def test_the_default_prompt_fills_rows_without_one() -> None:
    assert parse_row({"id": 1, "image": "a.png"}, "What is it?").query == "What is it?"
    assert parse_row({"id": 1, "prompt": "Own?"}, "What is it?").query == "Own?"


def test_a_folder_gives_one_row_per_image(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "sub/c.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    rows = folder_rows(tmp_path, "Describe it.")
    assert [row["id"] for row in rows] == ["a.JPG", "b.png", "sub/c.webp"]
    assert json.dumps(rows[0]) == '{"id": "a.JPG", "image": "a.JPG", "prompt": "Describe it."}'
    with pytest.raises(InputError, match="needs --prompt"):
        folder_rows(tmp_path, "")
    with pytest.raises(InputError, match="holds no image files"):
        folder_rows(tmp_path / "sub" / "c.webp", "x")
