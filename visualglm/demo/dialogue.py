"""Questions and conversations about easy-VQA images: the demo's training mix and its evaluation sets.

A turn is a :class:`~visualglm.demo.data.Record`: one of the image's own easy-VQA questions (English, or
its Chinese translation), a question from the phrasing grammar (:mod:`visualglm.demo.phrasings`), or an
out-of-scope input (:mod:`visualglm.demo.scope`, type ``oos``). A conversation is 1-5 turns about one
image, each turn in English or Chinese; the prompt of turn k holds turns 1..k-1 as history in the format
``ChatSession`` builds (``build_prompt_ids``), so training and chat see the same token sequences.

The evaluation sets are fixed (seeded) and use only the test split, held-out phrasings and held-out
out-of-scope inputs: nothing in them is seen in training (with ``TurnMix.check_held_out``, not even what
the augmentations, filler words and dropped words, make of a training question).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
from dataclasses import dataclass

from visualglm.demo.data import LANGS, Record, image_contents, load_split
from visualglm.demo.phrasings import (
    EN_PREFIXES,
    QTYPES,
    ZH_IMPERATIVE_PREFIXES,
    ZH_PREFIXES,
    all_frames,
    expand,
    phrase,
    title_case,
)
from visualglm.demo.scope import HELD_OUT_INPUTS, expand_input, out_of_scope
from visualglm.demo.scoring import normalize
from visualglm.demo.translate import COLORS, SHAPES, question_type, translate_answer, translate_question

LANG_MODES = ("en", "zh", "mixed")  # one language per conversation, or each turn's own


@dataclass(frozen=True)
class ImageFacts:
    """One image: its file, colour and shape (read from its pixels) and its easy-VQA ``(question, answer)``s."""

    image_id: int
    path: str
    color: str
    shape: str
    questions: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Conversation:
    """Turns about one image; ``turns[k].answers[0]`` is the reference answer of turn k + 1."""

    image: str
    image_id: int
    turns: tuple[Record, ...]


@dataclass(frozen=True)
class TurnMix:
    """Where turns come from (relative weights) and which grammar/out-of-scope split they use."""

    easyvqa: float = 0.35
    phrasing: float = 0.5
    oos: float = 0.15
    split: str = "train"  # "train" or "held-out" phrasings and out-of-scope inputs
    qtype_weights: tuple[float, ...] = (0.25, 0.25, 0.3, 0.2)  # color, shape, yes/no, describe
    capitalise: float = 0.5  # easy-VQA's English questions are lower case: capitalise some, as people type
    filler: float = 0.0  # share of in-scope questions given 1-2 filler words (see ``add_filler``); training only
    recase: float = 0.0  # share of English turns rewritten in capitals or title case (``recase``); training only
    drop_word: float = 0.0  # share of in-scope English questions that lose one word (``drop_word``); training only
    synonym: float = 0.0  # share of in-scope English questions whose participle is swapped (``swap_synonym``)
    check_held_out: bool = True  # leave a question as sampled where an augmentation made it a held-out one


def image_facts(split: str) -> list[ImageFacts]:
    """Every image of ``split`` whose pixel reading agrees with all of its data-set answers (all but one
    image of each split), sorted by id."""
    questions, paths = load_split(split)
    contents = image_contents(questions, paths)
    by_image: dict[int, list[tuple[str, str]]] = {i: [] for i in contents}
    for question, answer, image_id in questions:
        if image_id in by_image:
            by_image[image_id].append((question, answer))
    return [ImageFacts(i, paths[i], *contents[i], tuple(by_image[i])) for i in sorted(contents)]


# Filler: words that change neither what is asked nor whether it is about the image (politeness, hedges,
# articles). Words about the image itself (picture, drawn, shown, see, look ...) are not filler: they tell an
# in-scope question from an out-of-scope one. Chinese: particles and hedges.
FILLER = {
    "en": ("please", "just", "actually", "really", "exactly", "kindly", "maybe", "um", "well", "so", "now", "ok",
           "quickly", "again", "then", "here", "currently", "honestly", "basically", "the", "a", "this", "that",
           "you", "me", "i", "and", "also", "still", "right", "thanks", "sorry", "hmm", "oh"),
    "zh": ("请", "就", "呀", "啊", "吧", "嗯", "哦", "那", "这", "一下", "麻烦", "谢谢", "到底", "究竟", "现在", "其实",
           "还", "也", "又", "就是", "呃", "好"),
}
_ZH_DECIDING = frozenset("颜色形状红绿蓝黄青棕灰黑圆矩三角是否不没无吗什么哪有描述呢谁")


def add_filler(question: str, lang: str, rng: random.Random) -> str:
    """``question`` with 1-2 ``FILLER`` words inserted at random word boundaries (anywhere before the end
    punctuation in Chinese, but not inside a deciding word such as 什么 or 颜色): training on such questions
    teaches the model to read the words that decide the answer and let the others be."""
    pool = FILLER[lang]
    for _ in range(rng.choice((1, 1, 2))):
        word = rng.choice(pool)
        if lang == "en":
            parts = question.split(" ")
            at = rng.randrange(len(parts) + 1)
            question = " ".join(parts[:at] + [word] + parts[at:])
        else:
            body = question.rstrip("？?。！!")
            # not inside a word that decides (什|么, 颜|色, ...): between two deciding characters
            spots = [i for i in range(len(body) + 1)
                     if not (0 < i < len(body) and body[i - 1] in _ZH_DECIDING and body[i] in _ZH_DECIDING)]
            at = rng.choice(spots)
            question = body[:at] + word + body[at:] + question[len(body):]
    return question


# Words an English question cannot lose without changing its answer or whether it is about the image: the
# colour and shape names and the words for them, negations and "or" (yes/no), question words, and the words
# about the picture itself (the scope). Everything else (articles, pronouns, auxiliaries, prepositions,
# "tell me", "the thing") may go: "what colour is the shape in the image" -> "what colour is shape in the image".
KEEP_EN = frozenset(
    (*COLORS, *SHAPES, "color", "colour", "colors", "colours", "colored", "coloured", "shape", "shapes", "figure",
     "form", "outline", "contour", "geometric", "not", "no", "isn't", "doesn't", "don't", "aren't", "or", "yes",
     "what", "what's", "which", "how", "describe", "description", "summarize", "explain", "see", "look", "looking",
     "like", "show", "shows", "shown", "drawn", "draw", "painted", "sketched", "pictured", "depict", "depicted",
     "displayed", "illustrated", "printed", "contain", "contains", "visible", "present", "image", "picture",
     "photo", "pic"))
_END_PUNCTUATION = re.compile(r"[\s?.!]*$")
_NUMBER = re.compile(r"\{[nm]\}|\d+")


def drop_word(question: str, rng: random.Random) -> str:
    """``question`` (English) without one of its words outside ``KEEP_EN`` and not its first; unchanged when
    it has fewer than four words or none may go. Trained on such telegraphic questions the model learns that
    the kept words decide the answer and the scope, not the sentence's exact form."""
    end = _END_PUNCTUATION.search(question).group(0)
    words = question[:len(question) - len(end)].split(" ")
    spots = [i for i in range(1, len(words)) if re.sub(r"[^\w']", "", words[i].lower()) not in KEEP_EN]
    if len(words) < 4 or not spots:
        return question
    del words[rng.choice(spots)]
    return " ".join(words) + end


# Words the grammar uses alike in English questions ("what is pictured here", "in which colour is the shape
# drawn"): any one may stand for another without changing the answer or the scope.
SYNONYMS_EN = (("drawn", "pictured", "shown", "depicted", "painted", "sketched", "illustrated", "displayed",
                "printed"),)
_SYNONYM_GROUP = {word: group for group in SYNONYMS_EN for word in group}
_WORD_CORE = re.compile(r"^(\W*)([\w']+)(\W*)$")


def swap_synonym(question: str, rng: random.Random) -> str:
    """``question`` (English) with one of its ``SYNONYMS_EN`` words replaced by another of its group, in the
    same case; unchanged when it has none. One frame of the grammar then stands for its whole group: trained
    on "what is sketched here" as well as "what is pictured here", the model reads the participle as a kind
    of word instead of learning each frame's own."""
    words = question.split(" ")
    spots = []  # (word index, its match: leading punctuation, word, trailing punctuation; the word's group)
    for i, word in enumerate(words):
        match = _WORD_CORE.match(word)
        if match is not None and match.group(2).lower() in _SYNONYM_GROUP:
            spots.append((i, match, _SYNONYM_GROUP[match.group(2).lower()]))
    if not spots:
        return question
    i, match, group = rng.choice(spots)
    core = match.group(2)
    other = rng.choice([w for w in group if w != core.lower()])
    words[i] = match.group(1) + _in_case_of(other, core) + match.group(3)
    return " ".join(words)


def _in_case_of(word: str, model: str) -> str:
    """Lower-case ``word`` in ``model``'s case: capitals, capitalised or as it is."""
    if model.isupper() and len(model) > 1:
        return word.upper()
    return word.capitalize() if model[:1].isupper() else word


@functools.cache
def _held_out_keys(lang: str) -> tuple[frozenset[str], frozenset[str]]:
    """The keys (``_key``) of ``lang``'s question prefixes and of every held-out phrasing and input form."""
    forms = [f for frame in all_frames("held-out") if frame.lang == lang for f in expand(frame)]
    forms += [f for text in HELD_OUT_INPUTS[lang] for f in expand_input(text, lang)]
    prefixes = EN_PREFIXES if lang == "en" else (*ZH_PREFIXES, *ZH_IMPERATIVE_PREFIXES)
    return frozenset(_key(p) for p in prefixes), frozenset(_key(form) for form in forms)


def _key(text: str) -> str:
    """``text`` lower case without punctuation or spaces, numbers (and the ``{n}``/``{m}`` number slots of
    out-of-scope templates) as 0."""
    return normalize(_NUMBER.sub("0", text)).replace(" ", "")


def is_held_out(question: str, lang: str) -> bool:
    """True when ``question`` is a held-out phrasing or out-of-scope input (any prefix, case or punctuation):
    what the augmentations make of a training question must not be one."""
    key = _key(question)
    prefixes, held_out = _held_out_keys(lang)
    return any(key.startswith(p) and key[len(p):] in held_out for p in prefixes)


def recase(question: str, rng: random.Random) -> str:
    """``question`` in capitals or in title case (one of the two at random).

    With the demo's small vocabulary capitals are spelled letter by letter, so "WHAT COLOR IS IT" shares no
    piece with "what color is it": the grammar's own share of such forms (one in ten) left them far behind
    (held-out English phrasings: 61% right in capitals, 72% in title case, 96-98% otherwise).
    """
    if rng.random() < 0.5:
        return question.upper()
    return title_case(question)


def sample_turn(facts: ImageFacts, lang: str, rng: random.Random, mix: TurnMix) -> Record:
    """One turn about ``facts``'s image in ``lang``."""
    record = _sample_turn(facts, lang, rng, mix)
    if record.qtype != "oos":
        question = record.question
        if mix.drop_word and lang == "en" and rng.random() < mix.drop_word:
            question = drop_word(question, rng)
        if mix.synonym and lang == "en" and rng.random() < mix.synonym:
            question = swap_synonym(question, rng)
        if mix.filler and rng.random() < mix.filler:
            question = add_filler(question, lang, rng)
        # "is there a circle" + "here" is the held-out "is there a circle here", "what is pictured here" with
        # "drawn" the held-out "what is drawn here": such results stay unseen
        if question != record.question and not (mix.check_held_out and is_held_out(question, lang)):
            record = dataclasses.replace(record, question=question)
    # in and out of scope alike, so that capitals tell nothing about scope
    if mix.recase and lang == "en" and rng.random() < mix.recase:
        record = dataclasses.replace(record, question=recase(record.question, rng))
    return record


def _sample_turn(facts: ImageFacts, lang: str, rng: random.Random, mix: TurnMix) -> Record:
    source = rng.choices(("easyvqa", "phrasing", "oos"), (mix.easyvqa, mix.phrasing, mix.oos))[0]
    if source == "easyvqa" and facts.questions:
        question, answer = rng.choice(facts.questions)
        qtype = question_type(answer)
        if lang == "zh":
            question, answer = translate_question(question), translate_answer(answer)
        elif rng.random() < mix.capitalise:
            question = question[:1].upper() + question[1:]
        return Record(facts.path, question, (answer,), lang, qtype, facts.image_id)
    if source == "oos":
        question, reply = out_of_scope(lang, rng, mix.split)
        return Record(facts.path, question, (reply,), lang, "oos", facts.image_id)
    qtype = rng.choices(QTYPES, mix.qtype_weights)[0]
    question, answer, _ = phrase(qtype, lang, facts.color, facts.shape, rng, mix.split)
    return Record(facts.path, question, (answer,), lang, qtype, facts.image_id)


def turn_langs(mode: str, turns: int, rng: random.Random) -> list[str]:
    if mode not in LANG_MODES:
        raise ValueError(f"unknown language mode {mode!r} (use {', '.join(LANG_MODES)})")
    return [mode] * turns if mode in LANGS else [rng.choice(LANGS) for _ in range(turns)]


def sample_conversation(facts: ImageFacts, turns: int, mode: str, rng: random.Random, mix: TurnMix) -> Conversation:
    return Conversation(facts.path, facts.image_id,
                        tuple(sample_turn(facts, lang, rng, mix) for lang in turn_langs(mode, turns, rng)))


def history_of(conversation: Conversation, upto: int) -> list[tuple[str, str]]:
    """The reference ``(question, answer)`` pairs of the first ``upto`` turns."""
    return [(t.question, t.answers[0]) for t in conversation.turns[:upto]]


# ----- evaluation sets (test split only) ----------------------------------------------------------------
HELD_OUT = TurnMix(split="held-out")
EVAL_SEED = 2024


def heldout_phrasing_records(lang: str, per_type: int = 1, seed: int = EVAL_SEED,
                             facts: list[ImageFacts] | None = None) -> list[Record]:
    """``per_type`` held-out phrasings of each question type per test image, in ``lang``."""
    rng = random.Random(f"{seed}-phrasings-{lang}")
    records = []
    for f in facts if facts is not None else image_facts("test"):
        for qtype in QTYPES:
            for _ in range(per_type):
                question, answer, _ = phrase(qtype, lang, f.color, f.shape, rng, "held-out")
                records.append(Record(f.path, question, (answer,), lang, qtype, f.image_id))
    return records


def heldout_oos_records(lang: str, per_image: int = 1, seed: int = EVAL_SEED,
                        facts: list[ImageFacts] | None = None) -> list[Record]:
    """``per_image`` held-out out-of-scope inputs per test image, in ``lang``."""
    rng = random.Random(f"{seed}-oos-{lang}")
    records = []
    for f in facts if facts is not None else image_facts("test"):
        for _ in range(per_image):
            question, reply = out_of_scope(lang, rng, "held-out")
            records.append(Record(f.path, question, (reply,), lang, "oos", f.image_id))
    return records


def eval_conversations(mode: str, turns: int = 5, per_image: int = 2, seed: int = EVAL_SEED,
                       facts: list[ImageFacts] | None = None, mix: TurnMix = HELD_OUT) -> list[Conversation]:
    """``per_image`` conversations of ``turns`` turns per test image: its easy-VQA test questions, held-out
    phrasings and held-out out-of-scope inputs, in ``mode``'s languages."""
    if not 1 <= turns <= 16:
        raise ValueError(f"turns must be 1..16, got {turns}")
    rng = random.Random(f"{seed}-conversations-{mode}")
    return [sample_conversation(f, turns, mode, rng, mix)
            for f in (facts if facts is not None else image_facts("test")) for _ in range(per_image)]


def limit_items(items: list, limit: int | None, seed: int = 0) -> list:
    """A fixed seeded sample of ``limit`` items (all of them when ``limit`` is None or not smaller)."""
    if limit is None:
        return items
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    return random.Random(seed).sample(items, limit) if limit < len(items) else items
