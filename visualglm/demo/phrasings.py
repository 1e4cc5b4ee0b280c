"""A phrasing grammar for the demo's questions, in English and Chinese, with held-out phrasings.

easy-VQA asks with 24 fixed templates; people ask in their own words. Each question type (``color``,
``shape``, ``yes/no``, ``describe``) has sentence *frames* per language: word orders, synonyms
(``[a|b]``), politeness, the shape mentioned when asking the colour and the colour when asking the shape.
A frame's ``{slots}`` are filled from the image's own colour and shape (and, for yes/no questions, a probe
that is present or absent), then a surface form is chosen: capitals, punctuation, a polite prefix.

``TRAIN_FRAMES`` are the frames training sees. ``HELD_OUT_FRAMES`` are other frames, never used in
training, that measure whether the model understands phrasings it has not met (``visualglm eval
phrasings``); a test checks that no held-out question can coincide with a training question, an easy-VQA
template, or an out-of-scope input. Held-out frames are new sentences, not new meanings: the words that
decide the answer (colour and shape names, "colour"/"shape"/颜色/形状, negations such as "not"/没有) all occur
in training, while word order, filler words and synonyms around them may be new ("what sort of shape",
"呈现什么颜色"). A negation by a word training never shows ("is it absent") could not be inferred.

Yes/no questions follow easy-VQA's convention: a negated question ("is there not a red shape?") is answered
"yes" when the thing is absent.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from visualglm.demo.translate import COLORS, SHAPES, YES_NO, describe

QTYPES = ("color", "shape", "yes/no", "describe")
COLOR_NAMES = tuple(sorted(COLORS))
SHAPE_NAMES = tuple(sorted(SHAPES))


@dataclass(frozen=True)
class Frame:
    """One sentence frame. ``negated``: a yes/no frame whose "yes" means the probe is absent."""

    text: str
    qtype: str
    lang: str
    negated: bool = False


def _frames(lang: str, qtype: str, texts: str, negated: bool = False) -> tuple[Frame, ...]:
    """Frames from one per line of ``texts`` (blank lines ignored)."""
    return tuple(Frame(t.strip(), qtype, lang, negated) for t in texts.strip().splitlines() if t.strip())


# ----- English -----------------------------------------------------------------------------------------
# Slots: {cw} color/colour; {pic} image/picture/...; {obj} the thing asked about (may name its true shape);
# {objn} a short form of it; {objs} the thing without its shape (may name its true colour); {c}/{s} the true
# colour/shape; {c1} {c2} / {s1} {s2} two options, one of them true; yes/no probes: {x} "a red shape" or "a
# circle", {xb} the same without the article, {pc} a colour, {ps} a shape.
_EN_COLOR_TRAIN = """
what {cw} is {obj}
what is the {cw} of {obj}
which {cw} is {objn}
what {cw} does {objn} have
tell me the {cw} of {obj}
what's the {cw} of {obj}
{objn} is what {cw}
can you tell me what {cw} {obj} is
do you know the {cw} of {obj}
what {cw} do you see
name the {cw} of {obj}
what {cw} is {objn} in the {pic}
{cw} of {obj}
{cw}
what {cw}
how is {objn} [colored|coloured]
is {objn} {c1} or {c2}
what {cw} has been used for {obj}
could you name the {cw} of {obj}
in which {cw} is {objn} drawn
i want to know the {cw} of {obj}
what {cw} would you say {objn} is
what {cw} is {objn} painted
identify the {cw} of {obj}
please tell me which {cw} {objn} is
[and|so] the {cw}
what about the {cw}
and what {cw} is it
what {cw} is the shape in the {pic}
what {cw} is that {thing}
which {cw} are we seeing
what {cw} does {objn} look
"""
_EN_COLOR_HELD_OUT = """
which {cw} does {objn} have
what {cw} is shown in the {pic}
tell me which {cw} you see
could you tell me the {cw} of {obj}
what {cw} is {objn} drawn in
say the {cw} of {obj}
{objn} has which {cw}
do you know what {cw} {objn} is
what {cw} are we looking at
what {cw} is used in the {pic}
"""
_EN_SHAPE_TRAIN = """
what shape is {objs}
what shape is in the {pic}
what is the shape of {objs}
which shape is {objs}
what kind of shape is {objs}
what type of shape is in the {pic}
tell me the shape of {objs}
what shape does the {pic} show
what shape do you see
name the shape
what is the {c} shape
what shape is the {c} {thing}
shape of {objs}
shape
what shape
is it a {s1} or a {s2}
is {objs} a circle, a rectangle or a triangle
what geometric shape is {objs}
can you tell me what shape {objs} is
what form does {objs} have
identify the shape in the {pic}
what figure is drawn in the {pic}
what shape has the {cw} {c}
the {c} {thing} is what shape
which shape is shown
do you know the shape of {objs}
what is the name of the shape
[and|so] the shape
what about the shape
and what shape is it
what sort of figure is {objs}
what shape are we looking at
tell me the shape you see here
what is the outline of {objs}
what contour does {objs} have
which figure has been sketched
"""
_EN_SHAPE_HELD_OUT = """
which shape do you see
name the shape in the {pic}
what shape is shown here
could you tell me which shape {objs} is
what sort of shape is {objs}
which shape does the {pic} contain
what shape is drawn
tell me what shape you see
what shape is the {c} {thing} in the {pic}
what is the form of {objs}
"""
_EN_YES_NO_TRAIN = """
is there {x}
is there {x} in the {pic}
do you see {x}
does the {pic} show {x}
can you see {x}
does the {pic} contain {x}
is {x} present
is the shape {pc}
is it {pc}
is it a {ps}
is this a {ps}
is {objs} a {ps}
is {obj} {pc}
is there {x} anywhere
does the {pic} have {x}
is {x} shown
{x}, yes or no
would you say it is {pc}
is {x} visible in the {pic}
does {objn} look {pc} to you
is that shape {pc}
is there {x} right here
is {obj} painted {pc}
is {objn} {pc} in color
is the color of {objn} {pc}
has the shape been painted {pc}
"""
_EN_YES_NO_NEG_TRAIN = """
is there not {x}
is there not {x} in the {pic}
is no {xb} present
does the {pic} not contain {x}
is the shape not {pc}
is it not a {ps}
does the {pic} not show {x}
is {objn} not {pc}
is {x} not visible in the {pic}
isn't there {x}
isn't it {pc}
doesn't the {pic} show {x}
is there not any {xb} here
is it true that there is no {xb}
"""
_EN_YES_NO_HELD_OUT = """
do you see {x} in the {pic}
is that a {ps}
is there {x} here
is {objn} colored {pc}
does it look {pc}
can i see {x} in the {pic}
is {x} visible
"""
_EN_YES_NO_NEG_HELD_OUT = """
is there no {xb} in the {pic}
does the {pic} not have {x}
is {x} not in the {pic}
"""
_EN_DESCRIBE_TRAIN = """
describe this {pic}
describe the {pic}
what is in the {pic}
what do you see
tell me about the {pic}
what does the {pic} show
can you describe the {pic}
describe it
please describe what you see
what's in this {pic}
give me a description of the {pic}
what can you see in the {pic}
what does this {pic} contain
describe the shape and its {cw}
explain what the {pic} shows
describe
what does the {pic} look like
what are we looking at
look at the {pic} and describe it
what is pictured here
what's on the {pic}
could you tell me what the {pic} shows
describe the {pic} for me
what do we have here
what does the {pic} depict
tell me what the {pic} contains
summarize the {pic}
describe what has been drawn
tell me what is pictured in the {pic}
what did someone draw in this {pic}
what is sketched in the {pic}
what has been painted here
what is displayed on the {pic}
what's depicted here
tell me what is printed on the {pic}
what is illustrated in this {pic}
"""
_EN_DESCRIBE_HELD_OUT = """
what is drawn here
what is shown in the {pic}
describe what is in the {pic}
could you describe this {pic} for me
what does this {pic} look like
tell me what you see
"""

# ----- Chinese -----------------------------------------------------------------------------------------
# Slots: {obj} 这个图形 / 这个{s} ...; {objs} without the shape (may name the colour); {inpic} 图中 / 图片里 ...;
# {pic} 图片 / 这张图 ...; the others as in English.
_ZH_COLOR_TRAIN = """
{obj}是什么颜色
{obj}的颜色是什么
{inpic}的图形是什么颜色
{obj}是哪种颜色
请告诉我{obj}的颜色
{obj}是什么颜色的
什么颜色
颜色
{obj}的颜色是
你看到的是什么颜色
{obj}涂的是什么颜色
{obj}是{c1}还是{c2}
能告诉我{obj}是什么颜色吗
{inpic}形状的颜色是什么
{obj}是啥颜色
说一下{obj}的颜色
{obj}用了什么颜色
颜色是什么
图形是什么色
那颜色呢
{inpic}的东西是什么颜色
{inpic}的{s}是什么颜色
你知道{obj}是什么颜色吗
{obj}被画成什么颜色
{obj}呈什么颜色
你可以告诉我{obj}的颜色吗
"""
_ZH_COLOR_HELD_OUT = """
{pic}中的形状是什么颜色
你能说出{obj}的颜色吗
{obj}呈现什么颜色
请问{obj}是哪种颜色的
{obj}被涂成了什么颜色
看看{obj}是什么颜色
{pic}里图形的颜色是哪种
"""
_ZH_SHAPE_TRAIN = """
{inpic}是什么形状
{objs}是什么形状
{objs}的形状是什么
这是什么形状
{pic}包含什么形状
出现的是什么形状
{c}的图形是什么形状
请告诉我{objs}的形状
{objs}是哪种形状
形状
什么形状
{objs}是{s1}还是{s2}
{objs}是圆形、矩形还是三角形
{inpic}画的是什么形状
{objs}是啥形状
说一下{objs}的形状
{inpic}有什么形状
颜色是{c}的图形是什么形状
{c}的那个是什么形状
那形状呢
{inpic}是什么图形
你看到的是什么形状
能告诉我{objs}是什么形状吗
你知道{inpic}是什么形状吗
{objs}属于哪种形状
{objs}是什么样子的
"""
_ZH_SHAPE_HELD_OUT = """
你看到了哪种形状
{inpic}的图形属于什么形状
请说出{inpic}的形状
{objs}是什么样的形状
{c}的东西是什么形状的
能告诉我{inpic}是哪种形状吗
画面中出现了什么形状
"""
# The frames from "是不是存在{x}" on are positive twins of negated ones below, with the same endings (对吗,
# 是吗, 对不对, 吧): v4, trained without them, took "，对吗" for the negation ("图中有X，对吗" 57% right,
# "图片里没有X，是吗" 2%), so that only the negation word tells the twins apart.
_ZH_YES_NO_TRAIN = """
有{x}吗
{inpic}有{x}吗
存在{x}吗
{pic}包含{x}吗
{inpic}有没有{x}
这是{ps}吗
{obj}是{pc}的吗
{objs}是{ps}吗
它是{pc}吗
你能看到{x}吗
{inpic}是不是有{x}
这个图形是不是{ps}
{obj}是不是{pc}的
{inpic}画的是{x}吗
{pic}里面有{x}吗
你看得到{x}吗
{obj}是{pc}的吧
有没有{x}
{obj}的颜色是不是{pc}
是不是存在{x}
{pic}是不是包含{x}
{inpic}有{x}，对吗
{objs}是{ps}，对吗
{inpic}确实有{x}，对不对
{inpic}找得到{x}，对吗
{objs}是{ps}，是吗
{inpic}看得到{x}，对吗
{pic}中存在{x}，是吗
是不是找得到{x}
{inpic}存在{x}吧
"""
_ZH_YES_NO_NEG_TRAIN = """
是不是没有{x}
{inpic}是不是没有{x}
是不是不存在{x}
{pic}是不是不包含{x}
{inpic}没有{x}，对吗
{objs}不是{ps}，对吗
看不到{x}吗
{inpic}并没有{x}，对不对
{pic}不含{x}吗
{inpic}找不到{x}，对吗
{objs}不是{ps}，是吗
{obj}不是{pc}的吧
{inpic}看不到{x}，对吗
{pic}中不存在{x}，是吗
是不是找不到{x}
{inpic}不存在{x}吧
难道没有{x}吗
"""
_ZH_YES_NO_HELD_OUT = """
{inpic}能看到{x}吗
{pic}中含有{x}吗
{obj}的颜色是{pc}吗
{objs}的形状是{ps}吗
{inpic}出现了{x}吗
"""
_ZH_YES_NO_NEG_HELD_OUT = """
{inpic}是不是看不到{x}
{pic}里没有{x}，是吗
"""
_ZH_DESCRIBE_TRAIN = """
描述这张图片
描述一下这张图
图里有什么
这张图画了什么
请描述一下这幅图
你看到了什么
说说这张图片
图片上是什么
{inpic}是什么
这张图片的内容是什么
介绍一下这张图
图中有什么东西
描述图片
给我描述一下图片内容
描述一下图中的图形和颜色
可以描述一下这张图吗
你能说说图里有什么吗
帮我描述一下这张图
图里有哪些东西
图上画了什么
说说你看到的东西
这张图里有什么内容
讲讲这幅图
这里画的是什么
"""
_ZH_DESCRIBE_HELD_OUT = """
这幅图里画的是什么
请说说你在图中看到了什么
能描述一下这张图片吗
图片里有些什么
这张图里是什么东西
帮我看看这张图
"""


def _build(spec: dict[tuple[str, str], tuple[str, str]]) -> dict[tuple[str, str], tuple[Frame, ...]]:
    out = {}
    for (lang, qtype), (positive, negated) in spec.items():
        out[(lang, qtype)] = _frames(lang, qtype, positive) + (_frames(lang, qtype, negated, True) if negated else ())
    return out


TRAIN_FRAMES = _build({
    ("en", "color"): (_EN_COLOR_TRAIN, ""), ("en", "shape"): (_EN_SHAPE_TRAIN, ""),
    ("en", "yes/no"): (_EN_YES_NO_TRAIN, _EN_YES_NO_NEG_TRAIN), ("en", "describe"): (_EN_DESCRIBE_TRAIN, ""),
    ("zh", "color"): (_ZH_COLOR_TRAIN, ""), ("zh", "shape"): (_ZH_SHAPE_TRAIN, ""),
    ("zh", "yes/no"): (_ZH_YES_NO_TRAIN, _ZH_YES_NO_NEG_TRAIN), ("zh", "describe"): (_ZH_DESCRIBE_TRAIN, ""),
})
HELD_OUT_FRAMES = _build({
    ("en", "color"): (_EN_COLOR_HELD_OUT, ""), ("en", "shape"): (_EN_SHAPE_HELD_OUT, ""),
    ("en", "yes/no"): (_EN_YES_NO_HELD_OUT, _EN_YES_NO_NEG_HELD_OUT), ("en", "describe"): (_EN_DESCRIBE_HELD_OUT, ""),
    ("zh", "color"): (_ZH_COLOR_HELD_OUT, ""), ("zh", "shape"): (_ZH_SHAPE_HELD_OUT, ""),
    ("zh", "yes/no"): (_ZH_YES_NO_HELD_OUT, _ZH_YES_NO_NEG_HELD_OUT), ("zh", "describe"): (_ZH_DESCRIBE_HELD_OUT, ""),
})
SPLIT_FRAMES = {"train": TRAIN_FRAMES, "held-out": HELD_OUT_FRAMES}

# ----- slot values ---------------------------------------------------------------------------------------
# Each entry may itself hold slots ({s}, {c}, {pic}) and [a|b] alternatives.
_EN_SLOTS = {
    "cw": ("color", "colour"),
    "pic": ("image", "picture", "photo", "pic"),
    "objn": ("the shape", "the object", "the figure", "the thing", "it", "this", "the {s}", "this {s}",
             "this shape", "the item"),
    "obj": ("the shape", "the object", "the figure", "the thing", "it", "this", "the {s}", "this {s}",
            "this shape", "the item", "the shape in the {pic}", "the {s} in the {pic}"),
    "objs": ("it", "this", "the object", "the figure", "the thing", "the {c} object", "the {c} thing",
             "the {c} one", "the {c} figure", "this object", "the {c} shape"),
    "thing": ("object", "thing", "figure", "one", "shape"),
}
_EN_PROBE = {"color": ("a {pc} shape", "a {pc} object", "something {pc}", "anything {pc}", "a {pc} thing"),
             "shape": ("a {ps}", "any {ps}")}
_EN_BARE_PROBE = {"color": ("{pc} shape", "{pc} object"), "shape": ("{ps}",)}
_ZH_SLOTS = {
    "obj": ("这个图形", "图形", "这个东西", "图中的图形", "它", "这个形状", "图里的形状", "这个{s}", "图中的{s}",
            "这个物体", "那个图形", "画面里的东西"),
    "objs": ("这个图形", "图形", "这个东西", "它", "这个物体", "{c}的图形", "{c}的东西", "这个{c}的图形",
             "图中{c}的物体", "那个{c}的东西"),
    "inpic": ("图中", "图里", "图片中", "图片里", "画面中", "这张图里", "图像中"),
    "pic": ("图片", "这张图", "图像", "画面", "这幅图"),
}
_ZH_PROBE = {"color": ("{pc}的图形", "{pc}的东西", "{pc}的物体", "{pc}的形状"), "shape": ("{ps}",)}
_SLOTS = {"en": _EN_SLOTS, "zh": _ZH_SLOTS}
_PROBES = {"en": (_EN_PROBE, _EN_BARE_PROBE), "zh": (_ZH_PROBE, _ZH_PROBE)}

# Surface forms: prefixes people put in front of a question (the frame's meaning is unchanged).
EN_PREFIXES = ("", "", "", "", "please ", "hey, ", "ok, ", "so, ", "and ", "now ", "quick question: ",
               "excuse me, ", "hi, ")
ZH_PREFIXES = ("", "", "", "", "请问", "请问一下，", "你好，", "那", "那么", "麻烦问下，")
ZH_IMPERATIVE_PREFIXES = ("", "", "", "你好，", "那", "麻烦")  # "请问" does not go before a request
_EN_IMPERATIVE = ("tell", "name", "describe", "please", "identify", "give", "say", "explain", "i want")
_ZH_IMPERATIVE = ("请告诉", "描述", "说", "介绍", "给我", "请说", "帮我")
_SLOT = re.compile(r"\{(\w+)\}")
_CHOICE = re.compile(r"\[([^\[\]]*)\]")


def _word(lang: str, name: str) -> str:
    """A colour/shape/answer word in ``lang`` (``red`` -> ``红色`` in Chinese)."""
    return name if lang == "en" else {**COLORS, **SHAPES, **YES_NO}[name]


def _pick_alternatives(text: str, rng: random.Random) -> str:
    return _CHOICE.sub(lambda m: rng.choice(m.group(1).split("|")), text)


def fill(frame: Frame, color: str, shape: str, rng: random.Random) -> tuple[str, str]:
    """``(question, answer)`` for one image holding one ``color`` ``shape`` (English names), before the
    surface form: lower case English, no end punctuation."""
    lang = frame.lang
    slots = _SLOTS[lang]
    values = {"c": _word(lang, color), "s": _word(lang, shape)}
    answer = {"color": color, "shape": shape}.get(frame.qtype)
    text = frame.text
    names = set(_SLOT.findall(text))
    if names & {"c1", "c2"}:
        other = rng.choice([c for c in COLOR_NAMES if c != color])
        pair = [color, other] if rng.random() < 0.5 else [other, color]
        values |= {"c1": _word(lang, pair[0]), "c2": _word(lang, pair[1])}
    if names & {"s1", "s2"}:
        other = rng.choice([s for s in SHAPE_NAMES if s != shape])
        pair = [shape, other] if rng.random() < 0.5 else [other, shape]
        values |= {"s1": _word(lang, pair[0]), "s2": _word(lang, pair[1])}
    if frame.qtype == "yes/no":
        kind = ("color" if "pc" in names else "shape" if "ps" in names else rng.choice(("color", "shape")))
        truth, names_of = (color, COLOR_NAMES) if kind == "color" else (shape, SHAPE_NAMES)
        probe = truth if rng.random() < 0.5 else rng.choice([n for n in names_of if n != truth])
        present = probe == truth
        answer = "yes" if present != frame.negated else "no"
        values["pc" if kind == "color" else "ps"] = _word(lang, probe)
        probes, bare = _PROBES[lang]
        if "x" in names:
            values["x"] = rng.choice(probes[kind])
        if "xb" in names:
            values["xb"] = rng.choice(bare[kind])
    if frame.qtype == "describe":
        en, zh = describe(color, shape)
        answer = en if lang == "en" else zh
    for _ in range(4):  # slot values may hold slots ({obj} -> "the {s} in the {pic}" -> ...)
        text = _SLOT.sub(lambda m: values[m.group(1)] if m.group(1) in values
                         else _pick_alternatives(rng.choice(slots[m.group(1)]), rng), text)
        text = _pick_alternatives(text, rng)
    if _SLOT.search(text):
        raise ValueError(f"unfilled slot in {frame.text!r}: {text!r}")
    if frame.qtype != "describe":
        answer = _word(lang, answer)
    return text, answer


def title_case(text: str) -> str:
    """Every space-separated word capitalised ("Is It Red?"), the rest of each word as it was."""
    return " ".join(word[:1].upper() + word[1:] for word in text.split(" "))


def surface(text: str, lang: str, rng: random.Random, imperative: bool | None = None) -> str:
    """A surface form of a filled frame: a polite prefix sometimes, capitals (English), end punctuation."""
    if imperative is None:
        imperative = text.startswith(_EN_IMPERATIVE if lang == "en" else _ZH_IMPERATIVE)
    if lang == "en":
        prefix = rng.choice(EN_PREFIXES)
        text = prefix + text if not (prefix and text.startswith(prefix.strip(", "))) else text
        roll = rng.random()
        if roll < 0.5:
            text = text[:1].upper() + text[1:]
        elif roll < 0.55:
            text = text.upper()
        elif roll < 0.6:
            text = title_case(text)
        text = re.sub(r"\bi\b", "I", text) if roll < 0.5 else text
        ends = (".", "", "!", "?") if imperative else ("?", "?", "?", "", "", " ?", "??", ".")
    else:
        prefix = rng.choice(ZH_IMPERATIVE_PREFIXES if imperative else ZH_PREFIXES)
        text = prefix + text if not text.startswith(prefix) else text
        ends = ("。", "", "！", "？") if imperative else ("？", "？", "？", "?", "", "", "。")
    return text + rng.choice(ends)


def phrase(qtype: str, lang: str, color: str, shape: str, rng: random.Random,
           split: str = "train") -> tuple[str, str, Frame]:
    """A question of ``qtype`` in ``lang`` about a ``color`` ``shape`` image from ``split``'s frames:
    ``(question, answer, frame)``."""
    frames = SPLIT_FRAMES[split][(lang, qtype)]
    frame = rng.choice(frames)
    text, answer = fill(frame, color, shape, rng)
    return surface(text, lang, rng), answer, frame


def expand(frame: Frame) -> Iterator[str]:
    """Every filled form of ``frame`` over all slot values, alternatives, colours, shapes and probes (lower
    case, no prefix or punctuation): used to check that the frame sets cannot produce the same question."""
    slots = dict(_SLOTS[frame.lang])
    lang = frame.lang
    colors = [_word(lang, c) for c in COLOR_NAMES]
    shapes = [_word(lang, s) for s in SHAPE_NAMES]
    probes, bare = _PROBES[lang]
    slots |= {"c": colors, "s": shapes, "c1": colors, "c2": colors, "s1": shapes, "s2": shapes, "pc": colors,
              "ps": shapes, "x": probes["color"] + probes["shape"], "xb": bare["color"] + bare["shape"]}
    pending = [frame.text]
    seen: set[str] = set()
    while pending:
        text = pending.pop()
        choice = _CHOICE.search(text)
        if choice:
            pending += [text[:choice.start()] + option + text[choice.end():] for option in choice.group(1).split("|")]
            continue
        slot = _SLOT.search(text)
        if slot:
            pending += [text[:slot.start()] + value + text[slot.end():] for value in slots[slot.group(1)]]
            continue
        if text not in seen:
            seen.add(text)
            yield text


def all_frames(split: str) -> list[Frame]:
    return list(itertools.chain.from_iterable(SPLIT_FRAMES[split].values()))
