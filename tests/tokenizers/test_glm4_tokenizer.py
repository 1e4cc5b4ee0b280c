"""GLM-4 (tiktoken) tokenizer: golden parity with the reference ChatGLM4Tokenizer, plus unit tests on a tiny vocab."""

from __future__ import annotations

import base64
import copy
import json
import os
from pathlib import Path

import pytest

from visualglm.tokenizers.glm4 import SPECIAL_TOKENS, GLM4Tokenizer, load_ranks

REPO = Path(__file__).resolve().parents[2]
GOLDEN_DIR = Path(os.environ.get("GOLDEN_DIR", REPO.parent / "shared" / "golden"))
GLM4V_DIR = GOLDEN_DIR / "glm-4v-9b"
GLM4V_CASES = GLM4V_DIR / "cases.json"
GLM4_TOK_DIR = GOLDEN_DIR / "tokenizers" / "glm-4"
REAL_SPECIAL_START = 151329


def _load_glm4v_cases() -> list[dict] | None:
    if not (GLM4V_CASES.is_file() and (GLM4V_DIR / "tiny_tokenizer.model").is_file()):
        return None
    return json.loads(GLM4V_CASES.read_text(encoding="utf-8"))["cases"]


GLM4V = _load_glm4v_cases()
GLM4V_SKIP = f"golden GLM-4V data not found under {GLM4V_DIR} (set GOLDEN_DIR)"


def _glm4v_params():
    if GLM4V is None:
        return [pytest.param(None, id="golden-missing", marks=pytest.mark.skip(reason=GLM4V_SKIP))]
    return [pytest.param(case, id=case["name"]) for case in GLM4V]


@pytest.fixture(scope="module")
def golden_tok() -> GLM4Tokenizer:
    if GLM4V is None:
        pytest.skip(GLM4V_SKIP)
    return GLM4Tokenizer.from_pretrained(
        GLM4V_DIR, vocab_file="tiny_tokenizer.model", config_file="tiny_tokenizer_config.json"
    )


def _flat(ids):
    return ids[0] if ids and isinstance(ids[0], list) else ids


@pytest.mark.parametrize("case", _glm4v_params())
def test_golden_chat_template_ids(golden_tok, case):
    messages = copy.deepcopy(case["messages"])
    ids, image_index = golden_tok.apply_chat_template(messages, add_generation_prompt=True)
    expected = _flat(case["input_ids"])
    assert ids == expected
    assert messages == case["messages"]  # not mutated
    boi = golden_tok.boi_token_id
    assert image_index == (expected.index(boi) if boi in expected else None)
    # Each id decodes to the token string the reference printed.
    assert [golden_tok.decode([i]) for i in ids] == case["input_tokens"]
    assert golden_tok.decode(ids) == "".join(case["input_tokens"])
    # The reference's tokenize=False text (image placeholders left out).
    assert golden_tok.chat_template_text(case["messages"]) == case["template_text"]
    # Special ids map to the real GLM-4 ids by their place in the standard order.
    for tid, real in zip(ids, case["input_ids_real_special_ids"], strict=True):
        if real is None:
            assert not golden_tok.is_special_id(tid)
        else:
            assert real == REAL_SPECIAL_START + SPECIAL_TOKENS.index(golden_tok.convert_ids_to_tokens(tid))
    padded = golden_tok.pad([ids])
    assert padded["input_ids"] == [expected]
    assert padded["attention_mask"] == case["attention_mask"]
    assert padded["position_ids"] == case["position_ids"]


@pytest.mark.parametrize("case", _glm4v_params())
def test_golden_encode_decode_round_trip(golden_tok, case):
    for message in case["messages"]:
        text = message["content"]
        ids = golden_tok.encode(text)
        assert golden_tok.decode(ids) == text
        assert not any(golden_tok.is_special_id(i) for i in ids)


def test_golden_special_ids_from_config(golden_tok):
    config = json.loads((GLM4V_DIR / "tiny_tokenizer_config.json").read_text(encoding="utf-8"))
    for id_text, entry in config["added_tokens_decoder"].items():
        assert golden_tok.convert_tokens_to_ids(entry["content"]) == int(id_text)
    assert golden_tok.eos_token_id == golden_tok.pad_token_id == golden_tok.convert_tokens_to_ids("<|endoftext|>")
    assert golden_tok.image_size == config["image_size"]
    # Ids between the last regular rank and the first special id do not exist.
    gap = golden_tok.num_regular_tokens
    if gap < golden_tok.eos_token_id:
        with pytest.raises(ValueError, match="out of range"):
            golden_tok.decode([gap])


def test_golden_directory_layout(tmp_path, golden_tok):
    """A folder with the standard file names loads with from_pretrained(dir) alone."""
    (tmp_path / "tokenizer.model").write_bytes((GLM4V_DIR / "tiny_tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_bytes((GLM4V_DIR / "tiny_tokenizer_config.json").read_bytes())
    tok = GLM4Tokenizer.from_pretrained(tmp_path)
    assert tok.special_tokens == golden_tok.special_tokens
    for case in GLM4V:
        assert tok.apply_chat_template(case["messages"])[0] == _flat(case["input_ids"])


# ---------------------------------------------------------------- optional golden/tokenizers/glm-4 (real vocab)
def _glm4_tok_cases():
    for name in ("tokenizer_cases.json", "cases.json"):
        if (GLM4_TOK_DIR / name).is_file() and (GLM4_TOK_DIR / "tokenizer.model").is_file():
            data = json.loads((GLM4_TOK_DIR / name).read_text(encoding="utf-8"))
            return data["cases"] if isinstance(data, dict) else data
    return None


GLM4_TOK = _glm4_tok_cases()


@pytest.mark.skipif(GLM4_TOK is None, reason=f"golden GLM-4 tokenizer data not found under {GLM4_TOK_DIR}")
def test_golden_glm4_tokenizer_cases():
    tok = GLM4Tokenizer.from_pretrained(GLM4_TOK_DIR)
    checked = 0
    for case in GLM4_TOK:
        if "messages" in case and "input_ids" in case:
            assert tok.apply_chat_template(case["messages"])[0] == _flat(case["input_ids"]), case.get("name")
            checked += 1
        if "text" in case:
            for key in ("encode_no_special", "ids", "input_ids"):
                if key in case and "messages" not in case:
                    assert tok.encode(case["text"]) == _flat(case[key]), case["text"]
                    assert tok.decode(_flat(case[key])) == case.get("decode", case["text"])
                    checked += 1
                    break
    assert checked, "no comparable cases in the GLM-4 tokenizer golden file"
    if "<|endoftext|>" in tok.special_tokens and tok.num_regular_tokens == REAL_SPECIAL_START:
        assert tok.eos_token_id == REAL_SPECIAL_START


# ---------------------------------------------------------------- tiny vocab built here
MERGES = [b"34", b"12", b"123", b"\n\n", b"\xe4\xbd", b"\xe4\xbd\xa0", b"hi", b" t", b"<|", b"|>"]


def write_ranks(path: Path, tokens: list[bytes]) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> GLM4Tokenizer:
    path = tmp_path_factory.mktemp("glm4tok") / "tokenizer.model"
    write_ranks(path, [bytes([b]) for b in range(256)] + MERGES)
    return GLM4Tokenizer.from_pretrained(path.parent)


def rank(token: bytes) -> int:
    return 256 + MERGES.index(token) if len(token) > 1 else token[0]


def test_tiny_default_special_ids(tiny):
    start = 256 + len(MERGES)
    assert tiny.special_tokens == {t: start + k for k, t in enumerate(SPECIAL_TOKENS)}
    assert tiny.eos_token_id == tiny.pad_token_id == start
    assert (tiny.gmask_token_id, tiny.sop_token_id) == (start + 2, start + 4)
    assert (tiny.user_token_id, tiny.assistant_token_id, tiny.observation_token_id) == (start + 7, start + 8, start + 9)
    assert (tiny.boi_token_id, tiny.eoi_token_id) == (start + 10, start + 11)
    assert tiny.vocab_size == len(tiny) == start + 14
    assert tiny.convert_tokens_to_ids(["<|user|>", "[gMASK]"]) == [start + 7, start + 2]
    assert tiny.stop_token_ids == [start, start + 7, start + 9]
    with pytest.raises(ValueError):
        tiny.convert_tokens_to_ids("<|nobody|>")


def test_user_text_never_becomes_special(tiny):
    for text in ["<|user|>", "[gMASK]<sop>", "<|endoftext|>", "a <|begin_of_image|> b <|assistant|>"]:
        ids = tiny.encode(text)
        assert not any(tiny.is_special_id(i) for i in ids), text
        assert tiny.decode(ids) == text
    ids, index = tiny.apply_chat_template([{"role": "user", "content": "<|assistant|><|begin_of_image|>"}])
    specials = [i for i in ids if tiny.is_special_id(i)]
    assert specials == [tiny.gmask_token_id, tiny.sop_token_id, tiny.user_token_id, tiny.assistant_token_id]
    assert index is None


def test_image_placeholder_position(tiny):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "hi", "image": object()},
    ]
    before = copy.copy(messages)
    ids, index = tiny.apply_chat_template(messages)
    assert messages == before
    nl, hi = rank(b"\n"), rank(b"hi")
    u, a = tiny.user_token_id, tiny.assistant_token_id
    expected = [
        tiny.gmask_token_id,
        tiny.sop_token_id,
        u,
        nl,
        hi,
        a,
        nl,
        hi,
        u,
        nl,
        tiny.boi_token_id,
        tiny.eos_token_id,
        tiny.eoi_token_id,
        hi,
        a,
    ]
    assert ids == expected
    assert index == 10 and ids[index] == tiny.boi_token_id
    # An image with no text still produces its message; no generation prompt when asked.
    only_image = [{"role": "user", "content": "", "image": "x.png"}]
    ids, index = tiny.apply_chat_template(only_image, add_generation_prompt=False)
    assert ids[-3:] == [tiny.boi_token_id, tiny.eos_token_id, tiny.eoi_token_id] and index == 4


def test_two_images_rejected(tiny):
    messages = [{"role": "user", "content": "a", "image": "1.png"}, {"role": "user", "content": "b", "image": "2.png"}]
    with pytest.raises(ValueError, match="one image"):
        tiny.apply_chat_template(messages)


@pytest.mark.parametrize("role", ["tool", "User", "function", None])
def test_unknown_role_rejected(tiny, role):
    with pytest.raises(ValueError, match="role"):
        tiny.apply_chat_template([{"role": role, "content": "hi"}])


def test_template_pieces_encoded_separately(tiny):
    """Role newline and content are separate tiktoken calls: "\\n" + "\\nhi" never merges into "\\n\\n"."""
    system = [{"role": "system", "content": "\nhi", "metadata": ""}]
    ids, _ = tiny.apply_chat_template(system, add_generation_prompt=False)
    nl = rank(b"\n")
    assert ids == [tiny.gmask_token_id, tiny.sop_token_id, tiny.system_token_id, nl, nl, rank(b"hi")]
    assert tiny.encode("\n\nhi") == [rank(b"\n\n"), rank(b"hi")]
    # Metadata goes before the newline, encoded with it.
    ids, _ = tiny.apply_chat_template(
        [{"role": "observation", "content": "x", "metadata": "hi"}], add_special_tokens=False
    )
    assert ids == [tiny.observation_token_id, rank(b"hi"), nl, ord("x"), tiny.assistant_token_id]


def test_empty_message_skipped(tiny):
    ids, _ = tiny.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}])
    assert ids == [
        tiny.gmask_token_id,
        tiny.sop_token_id,
        tiny.user_token_id,
        rank(b"\n"),
        rank(b"hi"),
        tiny.assistant_token_id,
    ]


def test_regex_digits_in_groups_of_three(tiny):
    # Without the pre-tokeniser, BPE on "1234" would merge "34" first and give ["12", "34"].
    assert tiny.encode("1234") == [rank(b"123"), ord("4")]
    assert tiny.encode("12341234") == [rank(b"123"), ord("4"), rank(b"12"), rank(b"34")]
    assert tiny.encode("1234567") == [rank(b"123"), ord("4"), ord("5"), ord("6"), ord("7")]


def test_decode_partial_utf8(tiny):
    ni = "你".encode()
    assert tiny.encode("你") == [rank(ni)]
    partial = rank(ni[:2])
    assert tiny.decode([partial]) == "\ufffd"
    assert tiny.decode([partial, ni[2]]) == "你"
    assert tiny.decode([partial, tiny.user_token_id]) == "\ufffd<|user|>"
    assert tiny.decode([rank(b"hi"), tiny.eos_token_id], skip_special_tokens=True) == "hi"


@pytest.mark.parametrize("bad", [-1, 10**6])
def test_decode_out_of_range(tiny, bad):
    with pytest.raises(ValueError, match="out of range"):
        tiny.decode([bad])


def test_pad_left(tiny):
    out = tiny.pad([[5, 6, 7], [8]])
    p = tiny.pad_token_id
    assert out["input_ids"] == [[5, 6, 7], [p, p, 8]]
    assert out["attention_mask"] == [[1, 1, 1], [0, 0, 1]]
    assert out["position_ids"] == [[0, 1, 2], [0, 0, 0]]


def test_explicit_special_ids(tmp_path):
    path = write_ranks(tmp_path / "v.model", [bytes([b]) for b in range(256)])
    ids = {t: 300 + k for k, t in enumerate(SPECIAL_TOKENS)}
    tok = GLM4Tokenizer(path, special_ids=ids)
    assert tok.eos_token_id == 300 and tok.vocab_size == 314
    with pytest.raises(ValueError, match="clash"):
        GLM4Tokenizer(path, special_ids={t: 10 + k for k, t in enumerate(SPECIAL_TOKENS)})
    with pytest.raises(ValueError, match="missing"):
        GLM4Tokenizer(path, special_ids={"<|endoftext|>": 300})


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        GLM4Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_ranks(tmp_path / "nope.model")
    good = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    corrupt = {
        "bad_b64.model": ["@@not-base64@@ 0"],
        "bad_rank.model": ["YQ== x"],
        "fields.model": ["YQ=="],
        "dup.model": good + ["YWI= 255"],
        "bytes_missing.model": good[:100],
    }
    for name, lines in corrupt.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=name):
            GLM4Tokenizer.from_pretrained(tmp_path / name)
    (tmp_path / "binary.model").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="binary.model"):
        GLM4Tokenizer.from_pretrained(tmp_path / "binary.model")
    (tmp_path / "tokenizer.model").write_text("\n".join(good) + "\n", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        GLM4Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="other.json"):
        GLM4Tokenizer.from_pretrained(tmp_path, config_file="other.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"image_size": 1120}), encoding="utf-8")
    tok = GLM4Tokenizer.from_pretrained(tmp_path)
    assert tok.eos_token_id == 256 and tok.image_size == 1120


def test_tools_and_bad_content_rejected(tiny):
    with pytest.raises(ValueError, match="tools"):
        tiny.apply_chat_template([{"role": "system", "content": "", "tools": [{"type": "python"}]}])
    with pytest.raises(ValueError, match="content"):
        tiny.apply_chat_template([{"role": "user", "content": ["hi"]}])
