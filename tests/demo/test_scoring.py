"""Normalised exact match and the jsonl VQA format."""

from __future__ import annotations

import json

import pytest

from visualglm.demo.evaluate import read_vqa_jsonl
from visualglm.demo.scoring import content, is_correct, normalize

from ..conftest import make_png


def test_normalisation_ignores_case_space_and_punctuation() -> None:
    assert normalize("  Blue!! ") == "blue"
    assert normalize("蓝色。") == "蓝色"
    assert normalize("A  blue\trectangle.") == "a blue rectangle"
    assert is_correct("Yes.", "yes") and is_correct("YES", ["no", "yes"])


def test_an_answer_matches_when_the_accepted_word_is_its_only_content() -> None:
    assert is_correct("It is blue.", "blue")
    assert is_correct("The shape is a circle", "circle")
    assert is_correct("它是蓝色。", "蓝色")
    assert content("图中是一个蓝色的矩形。") == "蓝色的矩形"


def test_wrong_or_hedged_answers_do_not_match() -> None:
    assert not is_correct("blue or red", "blue")
    assert not is_correct("not blue", "blue")
    assert not is_correct("bluish", "blue")
    assert not is_correct("no", "yes")
    assert not is_correct("", "yes")
    assert not is_correct("图中是一个蓝色的矩形。", "蓝色")
    assert not is_correct("是", "否")


def test_vqa_jsonl_reads_paths_relative_to_the_file(tmp_path) -> None:
    make_png(tmp_path / "img.png")
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"image": "img.png", "question": "what color?", "answer": "red"}) + "\n\n"
                    + json.dumps({"image": "img.png", "question": "什么颜色？", "answer": ["红色", "红"]}) + "\n",
                    encoding="utf-8")
    records = read_vqa_jsonl(data)
    assert [r.lang for r in records] == ["en", "zh"]
    assert records[1].answers == ("红色", "红")
    assert records[0].image == str(tmp_path / "img.png")


@pytest.mark.parametrize("line, problem", [
    ("{not json", "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object"),
    ('{"image": "img.png", "question": "q"}', "line 2: missing answer"),
    ('{"image": "img.png", "question": "", "answer": "a"}', "line 2: question must be"),
    ('{"image": "img.png", "question": "q", "answer": []}', "line 2: answer must be"),
    ('{"image": "img.png", "question": "q", "answer": [1]}', "line 2: answer must be"),
    ('{"image": "missing.png", "question": "q", "answer": "a"}', "line 2: image file not found"),
    ('{"image": 5, "question": "q", "answer": "a"}', "line 2: image must be"),
])
def test_bad_vqa_lines_name_the_line(tmp_path, line, problem) -> None:
    make_png(tmp_path / "img.png")
    good = json.dumps({"image": "img.png", "question": "q", "answer": "a"})
    data = tmp_path / "qa.jsonl"
    data.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=problem):
        read_vqa_jsonl(data)


def test_empty_or_missing_vqa_files_are_refused(tmp_path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no questions"):
        read_vqa_jsonl(empty)
    with pytest.raises(FileNotFoundError):
        read_vqa_jsonl(tmp_path / "nope.jsonl")
