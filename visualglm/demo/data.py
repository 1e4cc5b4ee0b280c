"""easy-VQA as VisualGLM training and evaluation records, in English and Chinese.

Data comes from the ``easy-vqa`` PyPI package (MIT licence: 4,000 train / 1,000 test images of one
coloured shape on a light background, 64x64 px; 38,575 / 9,673 template questions; 13 answers). Each
question gives two records (English, and Chinese by :mod:`visualglm.demo.translate`); each image also
gives a description record per language, whose answer is derived from the image's own Q&A.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from visualglm.demo.translate import (
    COLORS,
    DESCRIBE_EN,
    DESCRIBE_ZH,
    SHAPES,
    describe,
    question_type,
    translate_answer,
    translate_question,
)

SPLITS = ("train", "test")
LANGS = ("en", "zh")


@dataclass(frozen=True)
class Record:
    """One question about one image. ``answers`` are the accepted answers (the first is the reference)."""

    image: str  # path of the image file
    question: str
    answers: tuple[str, ...]
    lang: str  # "en" or "zh"
    qtype: str  # "color", "shape", "yes/no" or "describe"
    image_id: int = -1


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError:
        raise RuntimeError("the easy-VQA data set is not installed: pip install easy-vqa "
                           "(or the package's [demo] extra)") from None
    return easy_vqa


def load_split(split: str) -> tuple[list[tuple[str, str, int]], dict[int, str]]:
    """easy-VQA's ``[(question, answer, image_id)]`` and ``{image_id: path}`` of a split."""
    if split not in SPLITS:
        raise ValueError(f"unknown easy-VQA split {split!r} (use {' or '.join(SPLITS)})")
    ev = _easy_vqa()
    texts, answers, ids = ev.get_train_questions() if split == "train" else ev.get_test_questions()
    paths = ev.get_train_image_paths() if split == "train" else ev.get_test_image_paths()
    return list(zip(texts, answers, ids, strict=True)), paths


# The exact RGB of each easy-VQA colour (the shapes are drawn in flat colour on a light background).
PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "teal": (0, 128, 128), "brown": (165, 42, 42), "gray": (128, 128, 128), "black": (0, 0, 0)}
_SUBJECT = re.compile(r"(?:a|no) (\w+)(?: shape)?(?: in the image| present)?\?$")


def pixel_contents(path: str | Path) -> tuple[str, str]:
    """``(color, shape)`` of an easy-VQA style image, read from its pixels.

    The foreground is every pixel far from the corner's background colour; its most frequent RGB is the
    shape's flat colour (the nearest palette entry). The shape follows from how much of its bounding box it
    fills: a triangle about half, a circle about pi/4, a rectangle all of it.
    """
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    foreground = np.abs(pixels - pixels[0, 0]).sum(-1) > 60
    if foreground.sum() < 4:
        raise ValueError(f"{path}: no shape found")
    values, counts = np.unique(pixels[foreground], axis=0, return_counts=True)
    rgb = values[counts.argmax()]
    color = min(PALETTE, key=lambda name: int(np.abs(rgb - np.array(PALETTE[name])).sum()))
    ys, xs = np.nonzero(foreground)
    fill = foreground.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "triangle" if fill < 0.69 else "circle" if fill < 0.905 else "rectangle"
    return color, shape


def answer_for(question: str, color: str, shape: str) -> str:
    """The correct answer to an easy-VQA template question about an image holding one ``color`` ``shape``."""
    q = question.strip().lower()
    if q.startswith("what"):
        kind = question_type_of(q)
        return color if kind == "color" else shape
    m = _SUBJECT.search(q)
    if not m or m.group(1) not in (*COLORS, *SHAPES):
        raise ValueError(f"not an easy-VQA yes/no question: {question!r}")
    present = m.group(1) in (color, shape)
    negated = " not " in q or q.startswith("is no ")
    return "yes" if present != negated else "no"


def question_type_of(question: str) -> str:
    """``color``, ``shape`` or ``yes/no`` from an easy-VQA question's wording."""
    q = question.strip().lower()
    if q.startswith("what color") or q.startswith("what is the color"):
        return "color"
    if q.startswith("what"):
        return "shape"
    return "yes/no"


def image_contents(questions: list[tuple[str, str, int]], paths: dict[int, str]) -> dict[int, tuple[str, str]]:
    """``{image_id: (color, shape)}`` read from the pixels and kept only where every one of the image's
    questions gets its data-set answer from them (a consistency check of the pixel reading)."""
    by_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for question, answer, image_id in questions:
        by_image[image_id].append((question, answer))
    out = {}
    for image_id, path in paths.items():
        color, shape = pixel_contents(path)
        if all(answer_for(q, color, shape) == a for q, a in by_image.get(image_id, [])):
            out[image_id] = (color, shape)
    return out


def build_records(split: str, langs: tuple[str, ...] = LANGS, describe_task: bool = True) -> list[Record]:
    """Every question of ``split`` in each language of ``langs``, plus one description per image/language."""
    for lang in langs:
        if lang not in LANGS:
            raise ValueError(f"unknown language {lang!r} (use en or zh)")
    questions, paths = load_split(split)
    records = []
    for question, answer, image_id in questions:
        path = paths[image_id]
        qtype = question_type(answer)
        if "en" in langs:
            records.append(Record(path, question, (answer,), "en", qtype, image_id))
        if "zh" in langs:
            records.append(Record(path, translate_question(question), (translate_answer(answer),), "zh", qtype,
                                  image_id))
    if describe_task:
        for image_id, (color, shape) in sorted(image_contents(questions, paths).items()):
            en, zh = describe(color, shape)
            if "en" in langs:
                records.append(Record(paths[image_id], DESCRIBE_EN, (en,), "en", "describe", image_id))
            if "zh" in langs:
                records.append(Record(paths[image_id], DESCRIBE_ZH, (zh,), "zh", "describe", image_id))
    return records


def corpus_lines(records: list[Record]) -> list[str]:
    """Distinct text lines (questions, answers) for training the tokenizer."""
    lines = {r.question for r in records} | {a for r in records for a in r.answers}
    return sorted(lines)


def image_path_exists(record: Record) -> bool:
    return Path(record.image).is_file()
