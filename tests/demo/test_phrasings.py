"""The phrasing grammar and the out-of-scope inputs: answers right, held-out phrasings disjoint from training."""

from __future__ import annotations

import random
import re

import pytest

from visualglm.demo.phrasings import (
    EN_PREFIXES,
    HELD_OUT_FRAMES,
    QTYPES,
    TRAIN_FRAMES,
    ZH_IMPERATIVE_PREFIXES,
    ZH_PREFIXES,
    all_frames,
    expand,
    fill,
    phrase,
)
from visualglm.demo.scope import HELD_OUT_INPUTS, SCOPE_REPLY, TRAIN_INPUTS, expand_input, out_of_scope
from visualglm.demo.scoring import normalize
from visualglm.demo.translate import COLORS, SHAPES, describe

EN_WORDS = {**{c: c for c in COLORS}, **{s: s for s in SHAPES}}
ZH_WORDS = {**{v: k for k, v in COLORS.items()}, **{v: k for k, v in SHAPES.items()}}
# Negation as written in each language (independent of the frames' own ``negated`` flag).
EN_NEGATION = re.compile(r"\b(not|no)\b|n't\b")
ZH_NEGATION = re.compile(r"没有|不存在|不包含|不含|不是|看不到|找不到")


def _key(text: str) -> str:
    return normalize(text).replace(" ", "")


def _mentioned(question: str, lang: str) -> set[str]:
    """The colour and shape names (English) a question mentions."""
    if lang == "en":
        return {w for w in re.findall(r"[a-z]+", question.lower()) if w in EN_WORDS}
    return {name for word, name in ZH_WORDS.items() if word in question}


@pytest.mark.parametrize("split", ["train", "held-out"])
def test_every_frame_fills_and_its_answer_follows_from_the_image(split) -> None:
    rng = random.Random(0)
    for frame in all_frames(split):
        for _ in range(12):
            color, shape = rng.choice(sorted(COLORS)), rng.choice(sorted(SHAPES))
            question, answer = fill(frame, color, shape, rng)
            assert "{" not in question and "[" not in question, question
            en_answer = answer if frame.lang == "en" else {**ZH_WORDS, "是": "yes", "否": "no"}.get(answer, answer)
            if frame.qtype == "color":
                assert en_answer == color, (question, answer)
            elif frame.qtype == "shape":
                assert en_answer == shape, (question, answer)
            elif frame.qtype == "describe":
                assert answer == describe(color, shape)[0 if frame.lang == "en" else 1]
            else:
                # Every colour/shape word of a yes/no question is true of the image except perhaps the probe;
                # "yes" means all are true, unless the question is negated.
                present = _mentioned(question, frame.lang) <= {color, shape}
                # "yes or no", 有没有 ("is there or not") and 是不是 ("is it or not") ask, they do not negate
                asked = question.replace("yes or no", "").replace("有没有", "有").replace("是不是", "是")
                negated = bool((EN_NEGATION if frame.lang == "en" else ZH_NEGATION).search(asked))
                assert en_answer == ("yes" if present != negated else "no"), (question, answer)


def test_the_grammar_has_many_forms_per_type_and_language() -> None:
    for (lang, qtype), frames in TRAIN_FRAMES.items():
        assert len(frames) >= 14, (lang, qtype)
        assert len(HELD_OUT_FRAMES[(lang, qtype)]) >= 5, (lang, qtype)
    assert {q for _, q in TRAIN_FRAMES} == set(QTYPES)
    # the colour asked while naming the shape, and the shape asked while naming the colour
    assert any("{s}" in f.text or "形状" in f.text for f in TRAIN_FRAMES[("zh", "color")])
    assert any("{c}" in f.text for f in TRAIN_FRAMES[("en", "shape")])


def _prefixed(forms: set[str], prefixes) -> set[str]:
    return {_key(p) + form for p in set(prefixes) for form in forms}


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_held_out_questions_can_never_be_training_questions(lang) -> None:
    from visualglm.demo.data import load_split
    from visualglm.demo.translate import translate_question

    pytest.importorskip("easy_vqa", reason="the easy-vqa package (dev extra) holds the data set")
    prefixes = EN_PREFIXES if lang == "en" else (*ZH_PREFIXES, *ZH_IMPERATIVE_PREFIXES)
    train = {_key(f) for frame in all_frames("train") if frame.lang == lang for f in expand(frame)}
    held = {_key(f) for frame in all_frames("held-out") if frame.lang == lang for f in expand(frame)}
    questions = {q for split in ("train", "test") for q, _, _ in load_split(split)[0]}
    easyvqa = {_key(q if lang == "en" else translate_question(q)) for q in questions}
    oos_train = {_key(f) for t in TRAIN_INPUTS[lang] for f in expand_input(t, lang)}
    oos_held = {_key(f) for t in HELD_OUT_INPUTS[lang] for f in expand_input(t, lang)}
    seen = _prefixed(train | easyvqa | oos_train, prefixes)
    assert not _prefixed(held, prefixes) & seen
    assert not _prefixed(oos_held, prefixes) & seen
    assert not _prefixed(oos_held, prefixes) & _prefixed(held, prefixes)
    assert len(held) > 1000 and len(oos_held) >= 16


def test_the_reported_new_phrasings_are_held_out() -> None:
    held = {_key(f) for frame in all_frames("held-out") for f in expand(frame)}
    for question in ("Which shape do you see?", "Name the shape in the picture.", "what is drawn here?",
                     "图片中的形状是什么颜色？"):
        assert _key(question) in held, question


def test_surface_forms_vary_capitals_and_punctuation() -> None:
    rng = random.Random(1)
    questions = [phrase("color", "en", "red", "circle", rng)[0] for _ in range(400)]
    assert any(q[:1].isupper() for q in questions) and any(q[:1].islower() for q in questions)
    assert any(q.endswith("?") for q in questions) and any(q[-1].isalpha() for q in questions)
    assert len(set(questions)) > 200
    zh = [phrase("shape", "zh", "red", "circle", rng)[0] for _ in range(200)]
    assert any(q.endswith("？") for q in zh) and any(not q.endswith(("？", "?", "。")) for q in zh)


def test_out_of_scope_inputs_get_the_reply_in_their_language() -> None:
    rng = random.Random(2)
    for lang in ("en", "zh"):
        for split in ("train", "held-out"):
            text, reply = out_of_scope(lang, rng, split)
            assert reply == SCOPE_REPLY[lang] and "{" not in text
    assert not re.search(r"[\u4e00-\u9fff]", SCOPE_REPLY["en"]) and re.search(r"[\u4e00-\u9fff]", SCOPE_REPLY["zh"])


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_held_out_phrasings_are_new_sentences_of_words_training_shows(lang) -> None:
    """Held-out frames measure whether the model understands new sentences, not whether it guesses words it
    never saw: every word (English) or character (Chinese) of a held-out question occurs in the training
    phrasings or their polite prefixes."""
    def words(text: str) -> set[str]:
        return set(re.findall(r"[a-z']+", text)) if lang == "en" else set(text)

    prefixes = EN_PREFIXES if lang == "en" else (*ZH_PREFIXES, *ZH_IMPERATIVE_PREFIXES)
    train = set().union(*(words(form) for frame in all_frames("train") if frame.lang == lang
                           for form in expand(frame)), *(words(p) for p in prefixes))
    held = set().union(*(words(form) for frame in all_frames("held-out") if frame.lang == lang
                         for form in expand(frame)))
    assert held <= train, sorted(held - train)


def test_out_of_scope_everyday_words_leave_out_the_held_out_inputs_words() -> None:
    from visualglm.demo.scope import _EN_SLOTS, _ZH_SLOTS

    held_en = " ".join(HELD_OUT_INPUTS["en"]).split()
    assert not set(_EN_SLOTS["word"]) & set(held_en)
    for word in _ZH_SLOTS["word"]:
        assert not any(word in text for text in HELD_OUT_INPUTS["zh"]), word
    colours_and_shapes = ("red", "green", "blue", "black", "gray", "yellow", "teal", "brown", "circle", "rectangle",
                          "triangle", "红", "绿", "蓝", "黑", "灰", "黄", "青", "棕", "圆", "方", "角")
    for word in (*_EN_SLOTS["word"], *_ZH_SLOTS["word"]):
        assert not any(c in word for c in colours_and_shapes), word
