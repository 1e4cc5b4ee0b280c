"""Streaming detokenisation, stop strings and ChatGLM-6B response post-processing (visualglm.generation.detok).

The streaming classes are checked against one-shot references: ``tokenizer.decode(ids)`` (on the real
ChatGLM-6B vocab when the golden data is there, and on a tiny byte-fallback vocab trained here) and
:func:`postprocess_chatglm`, which itself is checked on hand-written expectations (spec A7; the rule is
THUDM/chatglm-6b ``modeling_chatglm.py`` ``process_response``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from visualglm.generation.detok import (
    HF_CLEANUP,
    DecodeStream,
    IncrementalDetokenizer,
    StopStringMatcher,
    StreamReplace,
    chatglm_postprocessor,
    cleanup_stage,
    postprocess_chatglm,
)
from visualglm.tokenizers.chatglm import ChatGLMTokenizer
from visualglm.tokenizers.tiny import train_chatglm_sentencepiece

REPO = Path(__file__).resolve().parents[2]
GOLDEN_DIR = Path(os.environ.get("GOLDEN_DIR", REPO.parent / "shared" / "golden"))
REAL_TOK_DIR = GOLDEN_DIR / "tokenizers" / "chatglm-6b"

TEXTS = [
    "",
    "hello",
    "Hello world, this is a test.",
    "你好，世界！我是人工智能助手。",
    "中国的首都是北京,上海是城市!问答:图片;描述?",
    "mixed 中文 and English words 混合 text",
    "emoji 😀 and 👍🏽 and 🇨🇳 flags",
    "罕见字 龘靐齉爩 and 𠀀 (outside the BMP)",
    "line one\nline two\n\nline four\n",
    "\ttab\tseparated\t\tcolumns",
    "runs of  spaces   here    and" + " " * 85 + "end",
    "   leading and trailing spaces   ",
    "end of sentence . another one ? yes ! no , maybe",
    "don 't , can 't , I 'm , it 's , we 've , they 're",
    "a ' b and x ' . and ' quoted '",
    "a  . b   , c",
    "literal <n> and <|tab|> and <|blank_3|> text",
    "< n > <| tab |> <|blank_|> <|blank_99|>",
    "数学公式: a^2 + b^2 = c^2; 价格 100.5 元",
    "😀😀😀",
    "\n\n",
    " . ",
    "[[训练时间]]发布, 现在是[[训练时间]]!",
]


# ----------------------------------------------------------------------------- tokenizers
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> ChatGLMTokenizer:
    """A 500-piece vocab with ChatGLM's conventions and byte fallback (rare characters -> <0x..> pieces)."""
    directory = tmp_path_factory.mktemp("detok-tiny")
    train_chatglm_sentencepiece(directory)
    return ChatGLMTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def real() -> ChatGLMTokenizer:
    if not (REAL_TOK_DIR / "ice_text.model").is_file():
        pytest.skip(f"ChatGLM-6B vocab not found under {REAL_TOK_DIR} (set GOLDEN_DIR)")
    return ChatGLMTokenizer.from_pretrained(REAL_TOK_DIR)


@pytest.fixture(params=["tiny", "real"])
def tok(request) -> ChatGLMTokenizer:
    return request.getfixturevalue(request.param)


def stream(det: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [det.push(i) for i in ids] + [det.flush()]


# ----------------------------------------------------------------------------- detokenizer
def test_stream_equals_full_decode(tok) -> None:
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        det = IncrementalDetokenizer(tok)
        deltas = stream(det, ids)
        full = tok.decode(ids)
        assert "".join(deltas) == full, text
        assert det.text == full
        assert det.resyncs == 0, text  # the window technique did the work, not the full-decode fallback
        for delta in deltas:
            delta.encode("utf-8")  # valid text (no lone surrogates)
            if "\ufffd" not in full:
                assert "\ufffd" not in delta, (text, deltas)


def test_byte_fallback_pieces_never_split_a_character(tiny) -> None:
    text = "你好😀龘, 𠀀!"
    ids = tiny.encode(text, add_special_tokens=False)
    pieces = tiny.convert_ids_to_tokens(ids)
    assert sum(p.startswith("<0x") for p in pieces) >= 8  # the case under test really uses byte pieces
    deltas = stream(IncrementalDetokenizer(tiny), ids)
    assert "".join(deltas) == tiny.decode(ids) == "你好😀龘, 𠀀!"
    assert all("\ufffd" not in d for d in deltas)
    assert "😀" in deltas  # released whole, at its 4th byte


def test_word_spaces_follow_the_full_decode(tok) -> None:
    ids = tok.encode("hello world again", add_special_tokens=False)
    deltas = [d for d in stream(IncrementalDetokenizer(tok), ids) if d]
    assert deltas[0].startswith("h")  # the first word's "▁" is no space ...
    assert "".join(deltas) == "hello world again"  # ... the next ones' are


def test_cleanup_space_is_held_until_the_next_piece(real) -> None:
    ids = real.encode("yes .", add_special_tokens=False)
    det = IncrementalDetokenizer(real)
    deltas = stream(det, ids)
    assert "".join(deltas) == real.decode(ids) == "yes."
    ids = real.encode("x ' . y", add_special_tokens=False)  # " ' " would become "'" if " ." did not come first
    assert "".join(stream(IncrementalDetokenizer(real), ids)) == real.decode(ids) == "x '. y"


def char_piece_ids(tok: ChatGLMTokenizer, text: str) -> list[int]:
    """One piece per character (or its byte pieces): how a model may spell "<n>" in several tokens."""
    ids = []
    for char in text:
        piece_id = tok.sp.piece_to_id(char)
        if tok.sp.id_to_piece(piece_id) != char:
            ids += [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in char.encode("utf-8")]
        else:
            ids.append(piece_id)
    return [i + tok.num_image_tokens for i in ids]


def test_whitespace_pieces_spelled_in_several_tokens(tok) -> None:
    """ChatGLM's decode turns the *text* "<n>", "<|tab|>", "<|blank_N|>" into whitespace, even when the
    model spelled it with several pieces: a tail that may grow into one is held back."""
    ids = char_piece_ids(tok, "a<n>b<|tab|>c<|blank_3|>d<|blank_12|>e<|blank_1|>f<n")
    full = tok.decode(ids)
    assert full == "a\nb\tc   d" + " " * 12 + "e<|blank_1|>f<n"
    deltas = stream(IncrementalDetokenizer(tok), ids)
    assert "".join(deltas) == full
    assert not any(d.endswith("<") for d in deltas[:-1])


def test_cleanup_rules_are_the_tokenizers() -> None:
    from visualglm.tokenizers import chatglm

    assert HF_CLEANUP == chatglm._CLEANUP


def test_clean_up_can_be_turned_off(tok) -> None:
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        got = "".join(stream(IncrementalDetokenizer(tok, clean_up_tokenization_spaces=False), ids))
        assert got == tok.decode(ids, clean_up_tokenization_spaces=False), text


def test_random_id_sequences(tok) -> None:
    """Arbitrary ids (what a sampling model may emit): lone "▁", control ids, pads, stray bytes, pieces
    that spell "<n>" or " ." in several tokens - the stream still equals the one-shot decode."""
    rng = random.Random(1234)
    tricky = ["▁", "<n>", "<|tab|>", "<|blank_2|>", "<|blank_3|>", "<sop>", "<eop>", "[gMASK]", "<pad>",
              "<0xE4>", "<0xBD>", "<0xA0>", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "<0x20>", "<0x2E>",
              "<", "n", ">", "|", ".", "▁.", "'", "▁'", "s", "t", "▁n", ",", "!"]
    tricky_ids = [i for i in (tok.sp.piece_to_id(p) for p in tricky) if i != tok.unk_token_id]
    for _ in range(300):
        ids = [rng.choice(tricky_ids) if rng.random() < 0.6 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randint(1, 25))]
        det = IncrementalDetokenizer(tok)
        assert "".join(stream(det, ids)) == tok.decode(ids), tok.convert_ids_to_tokens(ids)
        assert det.resyncs == 0


def test_window_stays_short(real) -> None:
    ids = real.encode("ChatGLM-6B 是一个开源的对话模型, based on GLM. 😀 龘\n" * 40, add_special_tokens=False)
    det = IncrementalDetokenizer(real)
    widest = 0
    for i in ids:
        det.push(i)
        widest = max(widest, len(det.ids) - det._start)
    det.flush()
    assert det.text == real.decode(ids)
    assert widest <= 8


def test_resync_recovers_from_an_inconsistent_window(tiny) -> None:
    ids = tiny.encode("hello world 你好 again", add_special_tokens=False)
    det = IncrementalDetokenizer(tiny)
    out = [det.push(i) for i in ids[:3]]
    det._window_done = "not what the window decodes to"
    out += stream(det, ids[3:])
    assert det.resyncs == 1
    assert "".join(out) == tiny.decode(ids)


def test_push_after_flush_raises(tiny) -> None:
    det = IncrementalDetokenizer(tiny)
    det.push(tiny.encode("hi", add_special_tokens=False)[0])
    det.flush()
    assert det.flush() == ""
    with pytest.raises(RuntimeError):
        det.push(5)


class BytesTokenizer:
    """GLM-4-like decode (spec C4): token bytes concatenated, UTF-8 decoded with errors='replace'."""

    def __init__(self) -> None:
        self.vocab: list[bytes] = []

    def add(self, piece: bytes) -> int:
        self.vocab.append(piece)
        return len(self.vocab) - 1

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")


def test_any_decode_function_byte_level() -> None:
    rng = random.Random(7)
    tok = BytesTokenizer()
    for text in TEXTS:
        data = text.encode("utf-8")
        ids, pos = [], 0
        while pos < len(data):
            step = rng.randint(1, 3)
            ids.append(tok.add(data[pos: pos + step]))
            pos += step
        det = IncrementalDetokenizer(tok)
        deltas = stream(det, ids)
        assert "".join(deltas) == text
        assert all("\ufffd" not in d for d in deltas)
        assert det.resyncs == 0
    # invalid bytes no token completes: U+FFFD comes out in the end, as in the full decode
    ids = [tok.add(b"ok "), tok.add(b"\xe4\xbd"), tok.add(b"x"), tok.add(b"\xf0")]
    deltas = stream(IncrementalDetokenizer(tok), ids)
    assert "".join(deltas) == tok.decode(ids) == "ok \ufffdx\ufffd"
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tok, clean_up_tokenization_spaces=True)


# ----------------------------------------------------------------------------- streaming replace
def random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def feed_all(stage, chunks: list[str]) -> str:
    return "".join(stage.feed(c) for c in chunks) + stage.flush()


def test_stream_replace_equals_str_replace() -> None:
    rng = random.Random(3)
    cases = [("aa", "b", "aaaaa caab aaa"), ("aba", "X", "abababa abab"), (" .", ".", "a . b  . . ."),
             ("[[训练时间]]", "2023年", "[[[训练时间]]] [[训练 [[训练时间]][[训练时间]]")]
    for old, new, text in cases:
        for _ in range(50):
            assert feed_all(StreamReplace(old, new), random_chunks(text, rng)) == text.replace(old, new)
        assert feed_all(StreamReplace(old, new), list(text)) == text.replace(old, new)


def test_cleanup_stage_equals_sequential_replaces() -> None:
    def one_shot(text: str) -> str:
        for old, new in HF_CLEANUP:
            text = text.replace(old, new)
        return text

    rng = random.Random(5)
    for text in [*TEXTS, "x ' .", "a ' ' b", "don 't 's 're 've 'm", " ' ' ' "]:
        assert feed_all(cleanup_stage(), list(text)) == one_shot(text), text
        assert feed_all(cleanup_stage(), random_chunks(text, rng)) == one_shot(text), text


# ----------------------------------------------------------------------------- stop strings
def test_stop_string_held_then_stopped() -> None:
    m = StopStringMatcher(["User:"])
    assert m.feed("Hello Us") == "Hello "
    assert m.feed("e") == ""
    assert not m.stopped
    assert m.feed("r: more text") == ""
    assert m.stopped and m.stop_string == "User:"
    assert m.feed("anything") == "" and m.flush() == ""


def test_stop_string_prefix_released_when_it_cannot_complete() -> None:
    m = StopStringMatcher("User:")
    assert m.feed("Hello Us") == "Hello "
    assert m.feed("a") == "Usa"
    assert m.feed(" U") == " "
    assert m.flush() == "U"
    assert not m.stopped and m.stop_string is None


def test_stop_string_text_before_it_in_the_same_delta() -> None:
    m = StopStringMatcher(["\n\n", "###"])
    assert m.feed("a\n") == "a"
    assert m.feed("#") == "\n"
    assert m.feed("##x") == ""
    assert m.stopped and m.stop_string == "###"
    m = StopStringMatcher(["</s>"])
    assert m.feed("answer</s>junk") == "answer"


def test_stop_string_first_completed_wins() -> None:
    m = StopStringMatcher(["abcd", "bc"])
    assert m.feed("xabcd") == "xa" and m.stop_string == "bc"  # "bc" is complete before "abcd"
    m = StopStringMatcher(["bc", "abc"])
    assert m.feed("xabc") == "x" and m.stop_string == "abc"  # both complete at "c": the longer one


def test_stop_strings_do_not_depend_on_chunking() -> None:
    def reference(text: str, stops: list[str]) -> str:
        for k in range(1, len(text) + 1):
            ending = [s for s in stops if text[:k].endswith(s)]
            if ending:
                return text[: k - max(map(len, ending))]
        return text

    rng = random.Random(11)
    stops = ["ab", "bca", "cc", "abcab", "\n\nUser"]
    for _ in range(300):
        text = "".join(rng.choice("abc\nUser") for _ in range(rng.randint(0, 20)))
        want = reference(text, stops)
        assert feed_all(StopStringMatcher(stops), random_chunks(text, rng)) == want, text
        assert feed_all(StopStringMatcher(stops), list(text)) == want, text


def test_stop_strings_must_be_non_empty() -> None:
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])
    assert feed_all(StopStringMatcher([]), ["a", "b"]) == "ab"


# ----------------------------------------------------------------------------- ChatGLM post-processing
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  你好,世界!  ", "你好，世界！"),
        ("Hello, world! How: are; you?", "Hello, world! How: are; you?"),
        ("价格:100元", "价格：100元"),
        ("A:中文", "A：中文"),
        ("问题?答案", "问题？答案"),
        ("你好,,世界", "你好，，世界"),
        ("中 , 文", "中 , 文"),
        ("1,2,3", "1,2,3"),
        ("[[训练时间]],我", "2023年，我"),
        ("发布于[[训练时间]]!", "发布于2023年！"),
        ("\n\n答:好的\n", "答：好的"),
        ("a,中", "a，中"),
        ("中?!", "中？!"),
        ("?中", "？中"),
        ("，已经是全角", "，已经是全角"),
        ("日本語、カタカナ,テスト", "日本語、カタカナ,テスト"),  # katakana is outside U+4E00..U+9FFF
        ("\u3000全角空格\u3000", "全角空格"),  # str.strip() drops U+3000 too
        ("", ""),
        ("   ", ""),
    ],
)
def test_postprocess_chatglm(raw: str, expected: str) -> None:
    assert postprocess_chatglm(raw) == expected


def reference_process_response(response: str) -> str:
    """THUDM/chatglm-6b modeling_chatglm.py ``ChatGLMForConditionalGeneration.process_response``, verbatim."""
    import re

    response = response.strip()
    response = response.replace("[[训练时间]]", "2023年")
    punkts = [
        [",", "，"],
        ["!", "！"],
        [":", "："],
        [";", "；"],
        ["\\?", "？"],
    ]
    for item in punkts:
        response = re.sub(r"([\u4e00-\u9fff])%s" % item[0], r"\1%s" % item[1], response)  # noqa: UP031
        response = re.sub(r"%s([\u4e00-\u9fff])" % item[0], r"%s\1" % item[1], response)  # noqa: UP031
    return response


def test_postprocess_chatglm_matches_the_reference_code() -> None:
    rng = random.Random(21)
    alphabet = [*",!:;?，。 \n\tab1", "中", "文", "\u4e00", "\u9fff", "\u3400", "ア",
                "[[训练时间]]", "[[训练", "时间]]"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        assert postprocess_chatglm(text) == reference_process_response(text), text


POST_TEXTS = [
    *TEXTS,
    "  你好,世界!  ",
    "中,",
    ",中",
    "a,b,中,c;d:中?e!",
    "[[训练时间]],[[训练时间]]?[[训练",
    "[[[训练时间]]]",
    "\n\t 你好 \n\t",
    "中 \n ,\n 中",
    "??中!!",
    "好的 ",
    "   \n   ",
]


def test_stream_postprocessor_equals_one_shot() -> None:
    rng = random.Random(9)
    for text in POST_TEXTS:
        want = postprocess_chatglm(text)
        for cut in range(len(text) + 1):
            assert feed_all(chatglm_postprocessor(), [text[:cut], text[cut:]]) == want, (text, cut)
        assert feed_all(chatglm_postprocessor(), list(text)) == want, text
        for _ in range(20):
            assert feed_all(chatglm_postprocessor(), random_chunks(text, rng)) == want, text


def test_stream_postprocessor_holds_only_what_may_change() -> None:
    post = chatglm_postprocessor()
    assert post.feed("  你好") == "你好"
    assert post.feed("a,") == "a"  # "," waits for its next character
    assert post.feed("中") == "，中"
    assert post.feed("  ") == ""  # trailing whitespace waits
    assert post.feed("x") == "  x"
    assert post.feed(" \n") == ""
    assert post.flush() == ""  # and is dropped at the end


# ----------------------------------------------------------------------------- all together
def test_decode_stream_with_postprocessing(tok) -> None:
    for text in [*TEXTS, "  好的,我来回答:答案是[[训练时间]]!  "]:
        ids = tok.encode(text, add_special_tokens=False)
        s = DecodeStream(tok, postprocess="full-width")
        out = "".join(s.push(i) for i in ids) + s.flush()
        assert out == s.text == postprocess_chatglm(tok.decode(ids)), text


def test_decode_stream_stops(tok) -> None:
    ids = tok.encode("好的,答案是 42\n\nUser: next question", add_special_tokens=False)
    s = DecodeStream(tok, stop=["\n\nUser:"], postprocess="full-width")
    deltas = [s.push(i) for i in ids]
    assert s.stopped and s.stop_string == "\n\nUser:"
    assert "".join(deltas) + s.flush() == "好的，答案是 42"
    assert s.push(ids[0]) == "" and s.flush() == ""
    with pytest.raises(ValueError):
        DecodeStream(tok, postprocess="glm5")
