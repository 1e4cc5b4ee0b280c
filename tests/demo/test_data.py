"""easy-VQA preparation: every template translated, answers recovered from pixels, descriptions."""

from __future__ import annotations

import random
import re

import pytest

from visualglm.demo.data import answer_for, build_records, image_contents, load_split, pixel_contents
from visualglm.demo.draw import random_drawing
from visualglm.demo.translate import (
    ANSWERS_ZH,
    UntranslatableError,
    describe,
    question_type,
    translate_answer,
    translate_question,
)

pytest.importorskip("easy_vqa", reason="the easy-vqa package (dev extra) holds the data set")


@pytest.fixture(scope="module")
def splits():
    return {split: load_split(split) for split in ("train", "test")}


def _template(question: str) -> str:
    words = "red|green|blue|yellow|teal|brown|gray|black|circle|rectangle|triangle"
    return re.sub(rf"\b({words})\b", "X", question)


def test_every_question_of_both_splits_translates_without_english_left(splits) -> None:
    templates = set()
    for questions, _ in splits.values():
        for question, answer, _ in questions:
            chinese = translate_question(question)
            assert not re.search(r"[A-Za-z]", chinese), (question, chinese)
            assert chinese.endswith("？")
            assert not re.search(r"[A-Za-z]", translate_answer(answer))
            templates.add(_template(question))
    assert len(templates) == 24  # the data set's templates, all covered


def test_translation_keeps_the_meaning_words() -> None:
    assert translate_question("is there not a red shape?") == "是不是没有红色的图形？"
    assert translate_question("what is the blue shape?") == "蓝色的图形是什么形状？"
    assert translate_question("does the image contain a triangle?") == "图片包含三角形吗？"
    assert translate_answer("teal") == "青色" and translate_answer("no") == "否"
    assert len(set(ANSWERS_ZH.values())) == 13


def test_unknown_questions_and_answers_are_refused() -> None:
    with pytest.raises(UntranslatableError, match="no translation rule"):
        translate_question("how many shapes are there?")
    with pytest.raises(UntranslatableError, match="purple"):
        translate_answer("purple")
    with pytest.raises(UntranslatableError):
        question_type("maybe")


def test_pixel_reading_and_template_answers_reproduce_the_data_set(splits) -> None:
    questions, paths = splits["test"]
    contents = image_contents(questions, paths)
    assert len(contents) >= 0.99 * len(paths)
    checked = 0
    for question, answer, image_id in questions:
        if image_id in contents:
            assert answer_for(question, *contents[image_id]) == answer, question
            checked += 1
    assert checked > 9000


def test_pixel_reading_of_new_drawings() -> None:
    rng = random.Random(3)
    for _ in range(60):
        image, color, shape = random_drawing(rng, canvas=rng.choice([64, 100, 160]))
        path = "/dev/shm/visualglm-test-drawing.png"
        image.save(path)
        assert pixel_contents(path) == (color, shape)


def test_records_hold_both_languages_and_descriptions() -> None:
    records = build_records("test")
    by = {}
    for r in records:
        by.setdefault((r.lang, r.qtype), []).append(r)
    assert {k[1] for k in by} == {"color", "shape", "yes/no", "describe"}
    assert len(by[("en", "color")]) == len(by[("zh", "color")])
    en_describe = by[("en", "describe")][0]
    zh_describe = by[("zh", "describe")][0]
    assert en_describe.image == zh_describe.image
    assert re.fullmatch(r"A (red|green|blue|yellow|teal|brown|gray|black) (circle|rectangle|triangle)\.",
                        en_describe.answers[0])
    assert zh_describe.answers[0].startswith("图中是一个") and zh_describe.answers[0].endswith("。")
    assert describe("blue", "rectangle") == ("A blue rectangle.", "图中是一个蓝色的矩形。")
