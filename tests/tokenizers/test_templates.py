"""Prompt templates reproduce the reference token ids (golden cases) and texts."""

from __future__ import annotations

import json

import pytest

from visualglm.tokenizers.chatglm import ChatGLMTokenizer
from visualglm.tokenizers.templates import chatglm_prompt, visualglm_ids, visualglm_prompt

from ..conftest import GOLDEN_DIR


def test_chatglm_template_text() -> None:
    assert chatglm_prompt("hi") == "hi"
    assert chatglm_prompt("b", [("a", "x")]) == "[Round 0]\n问：a\n答：x\n[Round 1]\n问：b\n答："


def test_visualglm_template_text() -> None:
    assert visualglm_prompt("b", [("a", "x")]) == "问：a\n答：x\n问：b\n答："
    assert visualglm_prompt("b", [("a", "x")], english=True) == "Q:a\nA:x\nQ:b\nA:"


@pytest.mark.parametrize("folder", ["chatglm-6b", "visualglm-6b"])
def test_real_tokenizer_ids_of_golden_prompts(folder: str) -> None:
    vocab = GOLDEN_DIR / "tokenizers" / "chatglm-6b"
    cases_file = GOLDEN_DIR / folder / "cases.json"
    if not (vocab / "ice_text.model").is_file() or not cases_file.is_file():
        pytest.skip("golden tokenizer or cases missing")
    tokenizer = ChatGLMTokenizer.from_pretrained(vocab)
    for case in json.loads(cases_file.read_text())["cases"]:
        args = case["chat_args"]
        if "queries" in args:  # the batch case: plain queries
            want = [[t for t in row if t != tokenizer.pad_token_id] for row in case["real_tokenizer_ids"]]
            assert [tokenizer.encode(q) for q in args["queries"]] == want
            continue
        history = [tuple(turn) for turn in args["history"]]
        if folder == "visualglm-6b":
            ids, start = visualglm_ids(tokenizer, args["query"], history, image_length=case["image_length"])
            assert start == case["pre_image_length"]
        else:
            ids = tokenizer.encode(chatglm_prompt(args["query"], history))
        assert ids == case["real_tokenizer_ids"][0], case["name"]
