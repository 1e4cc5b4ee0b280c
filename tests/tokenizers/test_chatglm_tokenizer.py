"""ChatGLM-6B tokenizer: parity with the reference on the real vocab (golden cases), unit tests on a tiny one.

Expected values below are either golden data produced by the reference tokenizer, or worked out by hand from
the rules (spec A4); the tiny-vocab ids are looked up with a plain SentencePieceProcessor, not our class.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import sentencepiece as spm

from visualglm.tokenizers.chatglm import (
    ChatGLMTokenizer,
    blank_piece,
    decode_whitespace,
    encode_whitespace,
)
from visualglm.tokenizers.tiny import sample_corpus, train_chatglm_sentencepiece

REPO = Path(__file__).resolve().parents[2]
GOLDEN_DIR = Path(os.environ.get("GOLDEN_DIR", REPO.parent / "shared" / "golden"))
GOLDEN_TOK_DIR = GOLDEN_DIR / "tokenizers" / "chatglm-6b"
GOLDEN_FILE = GOLDEN_TOK_DIR / "tokenizer_cases.json"


# ----------------------------------------------------------------------------- golden (real ice_text.model)
def _golden() -> dict | None:
    if not (GOLDEN_FILE.is_file() and (GOLDEN_TOK_DIR / "ice_text.model").is_file()):
        return None
    return json.loads(GOLDEN_FILE.read_text(encoding="utf-8"))


GOLDEN = _golden()
SKIP_REASON = f"golden tokenizer data not found under {GOLDEN_TOK_DIR} (set GOLDEN_DIR)"


def _case_params() -> list:
    if GOLDEN is None:
        return [pytest.param(None, id="golden-missing", marks=pytest.mark.skip(reason=SKIP_REASON))]
    params = []
    for i, case in enumerate(GOLDEN["cases"]):
        slug = re.sub(r"[^0-9A-Za-z]+", "_", case["text"]).strip("_")[:20]
        slug = slug or ("cjk" if case["text"] else "empty")
        params.append(pytest.param(case, id=f"{i:02d}-{slug}"))
    return params


@pytest.fixture(scope="module")
def real() -> ChatGLMTokenizer:
    if GOLDEN is None:
        pytest.skip(SKIP_REASON)
    return ChatGLMTokenizer.from_pretrained(GOLDEN_TOK_DIR)


@pytest.mark.parametrize("case", _case_params())
def test_golden_case(real: ChatGLMTokenizer, case: dict) -> None:
    text = case["text"]
    assert real.encode(text) == case["encode_default"]
    assert real.encode(text, add_special_tokens=False) == case["encode_no_special"]
    assert real.tokenize(text) == case["tokens"]
    assert real.convert_tokens_to_ids(case["tokens"]) == case["encode_no_special"]
    assert real.convert_ids_to_tokens(case["encode_no_special"]) == case["tokens"]
    assert real.decode(case["encode_no_special"]) == case["decode_no_special"]
    assert real.decode(case["encode_default"]) == case["decode_default"]


def test_golden_special_ids_and_sizes(real: ChatGLMTokenizer) -> None:
    assert GOLDEN is not None
    for piece, idx in GOLDEN["special_ids"].items():
        assert real.convert_tokens_to_ids(piece) == idx, piece
        assert real.convert_ids_to_tokens(idx) == piece
    ids = GOLDEN["special_ids"]
    assert real.bos_token_id == ids["<sop>"]
    assert real.eos_token_id == ids["<eop>"]
    assert real.pad_token_id == ids["<pad>"]
    assert real.unk_token_id == ids["<unk>"]
    assert real.mask_token_id == ids["[MASK]"]
    assert real.gmask_token_id == ids["[gMASK]"]
    assert real.vocab_size == len(real) == GOLDEN["vocab_size"] == 130344


def test_golden_left_padding(real: ChatGLMTokenizer) -> None:
    assert GOLDEN is not None
    expected = GOLDEN["batch_left_padding_example"]["input_ids"]
    pad = real.pad_token_id
    # Strip the leading pads the reference put in, then pad again: must give the reference batch back.
    leading = [next((k for k, i in enumerate(row) if i != pad), len(row)) for row in expected]
    rows = [row[n:] for row, n in zip(expected, leading, strict=True)]
    padded, num_pad = real.pad_batch(rows)
    assert padded == expected
    assert num_pad == leading
    assert max(leading) > 0  # the example really exercises padding
    for row, stripped in zip(padded, rows, strict=True):
        assert real.decode(row) == real.decode(stripped)


def test_golden_no_dummy_prefix(real: ChatGLMTokenizer) -> None:
    # Golden: "你好" -> ["▁", "你好"] = [5, 74874]; without the dummy prefix only "你好" remains.
    assert real.encode("你好", add_special_tokens=False, add_dummy_prefix=False) == [74874]
    assert real.tokenize("你好", add_dummy_prefix=False) == ["你好"]


# ----------------------------------------------------------------------------- tiny vocab built here
BLANKS = [blank_piece(n) for n in range(2, 81)]


def _train(directory: Path, name: str, *, chatglm_pieces: bool, pad_is_text: bool = False) -> Path:
    if chatglm_pieces:
        return train_chatglm_sentencepiece(directory, name=name, pad_is_text=pad_is_text)
    import sentencepiece as spm

    corpus = directory / f"{name}.txt"
    corpus.write_text("\n".join(sample_corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory / name), vocab_size=500,
                                   model_type="unigram", character_coverage=1.0, byte_fallback=True,
                                   hard_vocab_limit=False, minloglevel=2, pad_id=-1)
    return directory / f"{name}.model"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_chatglm_vocab")
    _train(directory, "ice_text", chatglm_pieces=True)
    return directory


@pytest.fixture(scope="module")
def sp(tiny_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny_dir / "ice_text.model"))


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> ChatGLMTokenizer:
    return ChatGLMTokenizer(tiny_dir / "ice_text.model")


def test_whitespace_rules_by_hand() -> None:
    assert encode_whitespace("a\tb\nc") == "a<|tab|>b<n>c"
    assert encode_whitespace("a b") == "a b"  # a single space stays for SentencePiece
    assert encode_whitespace("x" + " " * 5 + "y") == "x<|blank_5|>y"  # not <|blank_2|><|blank_3|>
    assert encode_whitespace(" " * 83) == "<|blank_80|><|blank_3|>"  # longest first
    assert encode_whitespace(" " * 81) == "<|blank_80|> "
    assert encode_whitespace(" " * 160) == "<|blank_80|><|blank_80|>"
    assert encode_whitespace(" " * 6, max_blank_length=4) == "<|blank_4|><|blank_2|>"
    assert decode_whitespace("<|blank_80|><|blank_3|><n><|tab|>") == " " * 83 + "\n\t"
    assert decode_whitespace("<|blank_20|><|blank_2|>") == " " * 22


def test_longest_blank_first_in_pieces(tiny: ChatGLMTokenizer) -> None:
    pieces = tiny.tokenize("x" + " " * 5 + "y")
    assert "<|blank_5|>" in pieces and "<|blank_2|>" not in pieces and "<|blank_3|>" not in pieces
    pieces = tiny.tokenize("a" + " " * 83 + "b")
    blanks = [p for p in pieces if p.startswith("<|blank_")]
    assert blanks == ["<|blank_80|>", "<|blank_3|>"]
    assert tiny.tokenize("a\tb\nc").count("<|tab|>") == 1 and tiny.tokenize("a\nb\nc").count("<n>") == 2


ROUND_TRIP = [
    "line1\nline2",
    "\n\nleading newlines\n",
    "a\tb\t\tc",
    "x  y   z",
    "def f(x):\n    return x * 2\n",
    " " * 100 + "end",
    "trailing" + " " * 7,
    "你好\n世界\t中国",
    "emoji 😀 and 图片",
    "a" + " " * 81 + "b",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_round_trip(tiny: ChatGLMTokenizer, text: str) -> None:
    assert tiny.decode(tiny.encode(text)) == text
    assert tiny.decode(tiny.encode(text, add_special_tokens=False)) == text


def test_special_ids_come_from_the_vocab(tiny: ChatGLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    assert (tiny.pad_token_id, tiny.unk_token_id) == (3, 0)  # set by pad_id/unk_id when training
    assert tiny.bos_token_id == sp.piece_to_id("<sop>")
    assert tiny.eos_token_id == sp.piece_to_id("<eop>")
    assert tiny.mask_token_id == sp.piece_to_id("[MASK]")
    assert tiny.gmask_token_id == sp.piece_to_id("[gMASK]")
    assert len({tiny.bos_token_id, tiny.eos_token_id, tiny.mask_token_id, tiny.gmask_token_id, 3, 0}) == 6
    assert tiny.vocab_size == sp.get_piece_size() == 500


def test_special_tokens_appended(tiny: ChatGLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    gmask, sop, eop = sp.piece_to_id("[gMASK]"), sp.piece_to_id("<sop>"), sp.piece_to_id("<eop>")
    plain = tiny.encode("hello world", add_special_tokens=False)
    assert plain == sp.encode_as_ids("hello world")
    assert tiny.encode("hello world") == plain + [gmask, sop]
    assert tiny.encode("") == [gmask, sop]
    assert tiny.build_inputs_with_special_tokens([7, 8], [9]) == [7, 8, gmask, sop, 9, eop]
    assert tiny.decode([gmask, sop, eop]) == ""  # control pieces decode to nothing


def test_pad_removed_in_decode(tiny: ChatGLMTokenizer, tmp_path: Path) -> None:
    ids = tiny.encode("hello 你好")
    assert tiny.decode([3, 3] + ids) == tiny.decode(ids[:2] + [3] + ids[2:]) == "hello 你好"
    assert tiny.decode(3) == ""
    assert tiny.decode([]) == ""
    # In ice_text.model <pad> is a control piece and would decode to nothing anyway; make it visible.
    tok = ChatGLMTokenizer(_train(tmp_path, "pad_text", chatglm_pieces=True, pad_is_text=True))
    pad = tok.pad_token_id
    assert tok.convert_ids_to_tokens(pad) == "<pad>" and tok.sp.decode([pad]) == "<pad>"
    assert tok.decode([pad, pad] + tok.encode("hello")) == "hello"


def test_pad_batch_by_hand(tiny: ChatGLMTokenizer) -> None:
    assert tiny.pad_batch([[1, 2, 3], [4]], pad_id=9) == ([[1, 2, 3], [9, 9, 4]], [0, 2])
    assert tiny.pad_batch([[5], [6, 7]]) == ([[3, 5], [6, 7]], [1, 0])  # default: <pad> = 3
    assert tiny.pad_batch([]) == ([], [])


def test_num_image_tokens_offset(tiny_dir: Path, tiny: ChatGLMTokenizer) -> None:
    shifted = ChatGLMTokenizer(tiny_dir / "ice_text.model", num_image_tokens=20000)
    text = "hello\n你好  world"
    assert shifted.encode(text) == [i + 20000 for i in tiny.encode(text)]
    assert shifted.vocab_size == 20500
    assert shifted.pad_token_id == 20003 and shifted.unk_token_id == 20000
    assert shifted.gmask_token_id == tiny.gmask_token_id + 20000
    assert shifted.decode(shifted.encode(text)) == text
    assert shifted.decode([5, 19999] + shifted.encode(text)) == text  # image ids are dropped
    assert shifted.decode([20003] + shifted.encode(text)) == text  # the pad id is shifted too
    assert shifted.convert_ids_to_tokens(7) == "<image_7>"
    assert shifted.convert_tokens_to_ids("<image_7>") == 7
    assert shifted.convert_ids_to_tokens(20003) == "<pad>"
    assert tiny.convert_tokens_to_ids("<image_7>") == 0  # no image ids without an offset: unknown piece


def test_no_dummy_prefix(tiny: ChatGLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    assert tiny.tokenize("hello world")[0].startswith("▁")
    pieces = tiny.tokenize("hello world", add_dummy_prefix=False)
    assert not pieces[0].startswith("▁")
    assert "".join(pieces).replace("▁", " ") == "hello world"
    ids = tiny.encode("hello world", add_special_tokens=False, add_dummy_prefix=False)
    assert ids == [sp.piece_to_id(p) for p in pieces]
    assert tiny.decode(ids) == "hello world"
    assert tiny.encode("", add_dummy_prefix=False) == tiny.encode("")


def test_lower_case_and_remove_space(tiny_dir: Path, tiny: ChatGLMTokenizer) -> None:
    folding = ChatGLMTokenizer(tiny_dir / "ice_text.model", do_lower_case=True, remove_space=True)
    assert folding.tokenize("  Hello   WORLD \n") == tiny.tokenize("hello world")
    assert tiny.tokenize("a   b") != tiny.tokenize("a b")  # off by default


def test_clean_up_tokenization_spaces(tiny: ChatGLMTokenizer) -> None:
    ids = tiny.encode("what is this ?")
    assert tiny.decode(ids) == "what is this?"  # transformers' cleanup, on by default like the reference
    assert tiny.decode(ids, clean_up_tokenization_spaces=False) == "what is this ?"


def test_token_conversions(tiny: ChatGLMTokenizer, sp: spm.SentencePieceProcessor) -> None:
    expected = [sp.piece_to_id("<n>"), sp.piece_to_id("<|tab|>"), 0]  # unknown piece -> <unk> = 0
    assert tiny.convert_tokens_to_ids(["<n>", "<|tab|>", "no-such-piece"]) == expected
    assert tiny.convert_ids_to_tokens([tiny.gmask_token_id, tiny.bos_token_id]) == ["[gMASK]", "<sop>"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.decode([500])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.convert_ids_to_tokens(130001)


def test_from_pretrained_reads_config(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "custom.model").write_bytes((tiny_dir / "ice_text.model").read_bytes())
    config = {"vocab_file": "/stale/abs/path/custom.model", "num_image_tokens": 7, "do_lower_case": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = ChatGLMTokenizer.from_pretrained(tmp_path)
    assert tok.vocab_file == tmp_path / "custom.model"
    assert (tok.num_image_tokens, tok.do_lower_case, tok.remove_space) == (7, True, False)
    assert tok.pad_token_id == 10
    assert ChatGLMTokenizer.from_pretrained(tmp_path, num_image_tokens=0).pad_token_id == 3
    assert ChatGLMTokenizer.from_pretrained(tiny_dir).num_image_tokens == 0  # no config: default 0


def test_missing_vocab_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'ice_text\.model'.*" + re.escape(str(tmp_path))):
        ChatGLMTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        ChatGLMTokenizer.from_pretrained(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        ChatGLMTokenizer(tmp_path / "missing.model")


@pytest.mark.parametrize("content", [b"this is not a sentencepiece model", b""], ids=["garbage", "empty"])
def test_corrupt_vocab_errors(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "ice_text.model").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "ice_text.model"))):
        ChatGLMTokenizer.from_pretrained(tmp_path)


def test_vocab_without_chatglm_pieces(tmp_path: Path) -> None:
    path = _train(tmp_path, "plain", chatglm_pieces=False)
    with pytest.raises(ValueError, match=r"lacks the piece '<pad>'"):
        ChatGLMTokenizer(path)


def test_bad_num_image_tokens(tiny_dir: Path) -> None:
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="num_image_tokens"):
            ChatGLMTokenizer(tiny_dir / "ice_text.model", num_image_tokens=bad)  # type: ignore[arg-type]


def test_whole_pieces_always_encode_as_one(tmp_path) -> None:
    from visualglm.tokenizers.chatglm import ChatGLMTokenizer

    path = train_chatglm_sentencepiece(tmp_path, ["图中是不是有圆形", "是 不 是 没 有"] * 20, vocab_size=400,
                                       whole_pieces=("是不是",))
    tokenizer = ChatGLMTokenizer(path)
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("图中是不是没有圆形", add_special_tokens=False)]
    assert "是不是" in pieces and "没" in pieces and "不" not in pieces
    assert tokenizer.decode(tokenizer.encode("是不是", add_special_tokens=False)) == "是不是"
