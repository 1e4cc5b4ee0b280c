"""Train a small SentencePiece model that follows ChatGLM-6B's piece conventions.

Used for models the project builds itself (the offline demo, tests): like ``ice_text.model`` the 8 special
pieces are control symbols (they decode to nothing), ``<n>``, ``<|tab|>`` and ``<|blank_N|>`` are
user-defined pieces (always matched in the normalised text), and ``<unk>``/``<s>``/``</s>``/``<pad>`` sit at
ids 0..3.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

from visualglm.tokenizers.chatglm import MAX_BLANK_LENGTH, SPECIAL_PIECES, blank_piece

WHITESPACE_PIECES = ["<n>", "<|tab|>", *(blank_piece(n) for n in range(2, MAX_BLANK_LENGTH + 1))]


def sample_corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """A small mixed English/Chinese corpus (random word salad), enough to train a toy vocabulary."""
    rng = random.Random(seed)
    en = "the quick brown fox jumps over lazy dog hello world model chat image answer what is this".split()
    zh = list("你好世界我是人工智能助手北京上海中国的首都城市问答图片描述这张")
    out = []
    for _ in range(lines // 2):
        out.append(" ".join(rng.choice(en) for _ in range(8)))
        out.append("".join(rng.choice(zh) for _ in range(12)))
    return out


def train_chatglm_sentencepiece(directory: str | Path, corpus: Iterable[str] | None = None, *,
                                vocab_size: int = 500, name: str = "ice_text",
                                pad_is_text: bool = False, whole_pieces: Iterable[str] = ()) -> Path:
    """Train ``<directory>/<name>.model`` on ``corpus`` lines; returns the model file path.

    ``whole_pieces``: strings that always encode as one piece wherever they occur (user-defined pieces, as
    ``<n>`` is). ``pad_is_text`` makes ``<pad>`` a user-defined piece that decodes to its own text (tests use it to see
    that decoding drops pads) instead of SentencePiece's pad control id 3.
    """
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corpus_file = directory / f"{name}.txt"
    corpus_file.write_text("\n".join(corpus if corpus is not None else sample_corpus()), encoding="utf-8")
    user_symbols = list(WHITESPACE_PIECES) + (["<pad>"] if pad_is_text else []) + list(whole_pieces)
    spm.SentencePieceTrainer.train(
        input=str(corpus_file), model_prefix=str(directory / name), vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, byte_fallback=True, hard_vocab_limit=False,
        minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1 if pad_is_text else 3,
        control_symbols=list(SPECIAL_PIECES), user_defined_symbols=user_symbols,
    )
    corpus_file.unlink()
    return directory / f"{name}.model"


def write_glm4_ranks(directory: str | Path, corpus: Iterable[str] | None = None, *, words: int = 200,
                     name: str = "tokenizer.model") -> Path:
    """Write a small GLM-4-style tiktoken ranks file (``<base64 of the token bytes> <rank>`` a line) for
    ``corpus`` lines; returns its path.

    Ranks 0..255 are the single bytes (a byte-level BPE needs all of them); then, for the ``words`` most
    frequent words (each also with a leading space, as the pre-tokeniser cuts them; a word outside ASCII
    counts as its characters, since Chinese text has no spaces), every prefix of two or
    more bytes, shorter ones first, so that tiktoken's merges can build each word from its bytes. The 14
    special tokens are not in the file: the tokenizer gives them the ids right after the last rank.
    """
    import base64
    from collections import Counter

    lines = list(corpus if corpus is not None else sample_corpus())
    counts = Counter(piece for line in lines for word in line.split()
                     for piece in ([word] if word.isascii() else list(word)))
    tokens: list[bytes] = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    for word, _ in counts.most_common(words):
        for form in (word.encode(), f" {word}".encode()):
            for end in range(2, len(form) + 1):
                if form[:end] not in seen:
                    seen.add(form[:end])
                    tokens.append(form[:end])
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)),
                    encoding="ascii")
    return path
