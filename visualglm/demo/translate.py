"""Rule-based English -> Chinese translation of easy-VQA's questions and answers.

easy-VQA's questions come from 24 templates (a colour and/or a shape word in a fixed sentence), so a table
of templates translates every question exactly and deterministically. A question that matches no template
raises ``UntranslatableError`` (tests run every question of both splits through it).
"""

from __future__ import annotations

import re

COLORS = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "teal": "青色", "brown": "棕色",
          "gray": "灰色", "black": "黑色"}
SHAPES = {"circle": "圆形", "rectangle": "矩形", "triangle": "三角形"}
YES_NO = {"yes": "是", "no": "否"}
ANSWERS_ZH = {**COLORS, **SHAPES, **YES_NO}

_C = "(?P<color>" + "|".join(COLORS) + ")"
_S = "(?P<shape>" + "|".join(SHAPES) + ")"

# (English template as a regex, Chinese template). {c} is the translated colour, {s} the translated shape,
# {x} whichever of the two the template holds (a colour is written "X的图形", a shape plainly).
_TEMPLATES: list[tuple[str, str]] = [
    # colour of the (named) shape
    ("what color is the shape", "这个图形是什么颜色？"),
    ("what is the color of the shape", "图形的颜色是什么？"),
    (f"what color is the {_S}", "这个{s}是什么颜色？"),
    (f"what is the color of the {_S}", "{s}的颜色是什么？"),
    # which shape
    ("what shape is in the image", "图中是什么形状？"),
    ("what shape does the image contain", "图片包含什么形状？"),
    ("what shape is present", "出现的是什么形状？"),
    (f"what is the {_C} shape", "{c}的图形是什么形状？"),
    # yes/no, positive
    ("is there a {x}", "有{x}吗？"),
    ("is there a {x} in the image", "图中有{x}吗？"),
    ("is a {x} present", "存在{x}吗？"),
    ("does the image contain a {x}", "图片包含{x}吗？"),
    # yes/no, negated: the answer is "yes" when the thing is absent
    ("is there not a {x}", "是不是没有{x}？"),
    ("is there not a {x} in the image", "图中是不是没有{x}？"),
    ("is no {x} present", "是不是不存在{x}？"),
    ("does the image not contain a {x}", "图片是不是不包含{x}？"),
]


class UntranslatableError(ValueError):
    """An easy-VQA question or answer outside the known templates and words."""


def _compile() -> list[tuple[re.Pattern[str], str]]:
    rules = []
    for english, chinese in _TEMPLATES:
        if "{x}" in english:  # one rule for the colour form ("a red shape") and one for the shape form
            rules.append((re.compile("^" + english.replace("{x}", f"{_C} shape") + r"\?$"),
                          chinese.replace("{x}", "{c}的图形")))
            rules.append((re.compile("^" + english.replace("{x}", _S) + r"\?$"), chinese.replace("{x}", "{s}")))
        else:
            rules.append((re.compile("^" + english + r"\?$"), chinese))
    return rules


_RULES = _compile()


def translate_question(question: str) -> str:
    """The Chinese form of an easy-VQA question (e.g. ``is there not a red shape?`` -> ``是不是没有红色的图形？``)."""
    text = question.strip().lower()
    for pattern, chinese in _RULES:
        match = pattern.match(text)
        if match:
            words = match.groupdict()
            return chinese.format(c=COLORS.get(words.get("color") or "", ""),
                                  s=SHAPES.get(words.get("shape") or "", ""))
    raise UntranslatableError(f"no translation rule for the question {question!r}")


def translate_answer(answer: str) -> str:
    """The Chinese form of an easy-VQA answer word (``blue`` -> ``蓝色``, ``yes`` -> ``是``)."""
    try:
        return ANSWERS_ZH[answer.strip().lower()]
    except KeyError:
        raise UntranslatableError(f"no translation for the answer {answer!r}") from None


def question_type(answer: str) -> str:
    """easy-VQA's question types, told apart by the answer: ``color``, ``shape`` or ``yes/no``."""
    word = answer.strip().lower()
    if word in COLORS:
        return "color"
    if word in SHAPES:
        return "shape"
    if word in YES_NO:
        return "yes/no"
    raise UntranslatableError(f"unknown easy-VQA answer {answer!r}")


def describe(color: str, shape: str) -> tuple[str, str]:
    """The description task's answers for one image: (``A blue rectangle.``, ``图中是一个蓝色的矩形。``)."""
    return f"A {color} {shape}.", f"图中是一个{COLORS[color]}的{SHAPES[shape]}。"


DESCRIBE_EN = "Describe this image."
DESCRIBE_ZH = "描述这张图片。"
