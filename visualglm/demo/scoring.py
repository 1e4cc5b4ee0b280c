"""Normalised exact match of free-text answers (the VQA habit: case, whitespace and punctuation ignored).

An answer is correct when, normalised, it equals one of the accepted answers, or when the accepted answer is
the answer's only content word ("It is blue." for "blue"; "图中是一个蓝色的矩形" has more than one and is
not "蓝色"). Chinese answers have no spaces: a few filler phrases are stripped instead.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

# Words that carry no answer content in short English VQA replies.
STOPWORDS = frozenset("a an the it its is are this that there shape shapes color colour image picture in of "
                      "i think answer".split())
# Chinese fillers around a short answer ("它是蓝色" -> "蓝色"); longest first.
ZH_FILLERS = ("图中是一个", "图片中是一个", "这是一个", "图中是", "这是", "它是", "答案是", "一个")
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower case, punctuation (any Unicode P* category, full-width included) to spaces, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return _SPACES.sub(" ", text).strip()


def content(text: str) -> str:
    """The normalised answer without filler words (English) or filler phrases (Chinese)."""
    words = [w for w in normalize(text).split(" ") if w and w not in STOPWORDS]
    joined = " ".join(words)
    for filler in ZH_FILLERS:
        if joined.startswith(filler) and len(joined) > len(filler):
            joined = joined[len(filler):]
    return joined


def is_correct(answer: str, accepted: str | Sequence[str]) -> bool:
    """True when ``answer`` matches any of ``accepted`` (see the module docstring)."""
    options = [accepted] if isinstance(accepted, str) else list(accepted)
    said = normalize(answer)
    core = content(answer)
    for option in options:
        wanted = normalize(option)
        if wanted and (said == wanted or core == wanted):
            return True
    return False
