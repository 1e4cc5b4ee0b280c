"""ChatSession: streaming, history, the reference template, and exact KV-cache reuse."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

import visualglm
from visualglm.compat import AutoModel, AutoTokenizer
from visualglm.generation.chat import FAMILY_DEFAULT, ChatSession, regenerate, resolve_max_length
from visualglm.generation.engine import GenerationParams, generate_steps
from visualglm.generation.sampling import SamplingParams

GREEDY = SamplingParams(do_sample=False)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_chat_checkpoint: Path):
    return visualglm.load(tiny_chat_checkpoint, progress=False), visualglm.load_tokenizer(tiny_chat_checkpoint)


def test_stream_concatenates_to_chat_and_updates_history(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    streamed = ChatSession(model, tokenizer, sampling=GREEDY, max_new_tokens=12)
    deltas = list(streamed.stream("你好"))
    whole = ChatSession(model, tokenizer, sampling=GREEDY, max_new_tokens=12).chat("你好")
    assert "".join(deltas) == whole
    assert streamed.history == [("你好", whole)]


def test_second_turn_equals_a_fresh_session_with_that_history(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    session = ChatSession(model, tokenizer, sampling=GREEDY, max_new_tokens=10)
    session.chat("hello world")
    second = session.chat("what is this")
    fresh = ChatSession(model, tokenizer, sampling=GREEDY, max_new_tokens=10, history=session.history[:1])
    assert fresh.chat("what is this") == second


def test_regenerate_reuses_the_whole_prompt_exactly(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    session = ChatSession(model, tokenizer, sampling=GREEDY, max_new_tokens=8)
    first = session.chat("the quick brown fox")
    prompt_length = len(session.prompt_ids("the quick brown fox")[0])
    again = regenerate(session)
    assert session.last_prefill_tokens == 1  # only the last prompt token was computed again
    assert again == first and len(session.history) == 1
    assert prompt_length > 1


def test_growing_history_is_not_reused_because_it_would_change_the_answer(model_and_tokenizer) -> None:
    # Evidence for the rule in ChatGLMForCausalLM.reusable_prefix: the turn-2 prompt starts with the
    # same tokens as turn 1, but they sit in the bidirectional context, so their cached keys/values differ.
    model, tokenizer = model_and_tokenizer
    turn1 = tokenizer.encode("[Round 0]\n问：hello\n答：")
    turn2 = tokenizer.encode("[Round 0]\n问：hello\n答：world\n[Round 1]\n问：what\n答：")
    common = next(i for i, (a, b) in enumerate(zip(turn1, turn2, strict=False)) if a != b)
    assert common > 3
    assert model.reusable_prefix(turn1, turn2) == 0
    params = GenerationParams(max_new_tokens=1)
    list(generate_steps(model, [turn1], params=params, keep_cache=True))
    naive = next(iter(generate_steps(model, [turn2], params=params, reuse_prefix=common))).logits
    exact = next(iter(generate_steps(model, [turn2], params=params))).logits
    assert (naive - exact).abs().max().item() > 1e-3


def test_reset_forgets_everything(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    session = ChatSession(model, tokenizer, sampling=GREEDY, max_new_tokens=4)
    session.chat("hello")
    session.reset()
    assert session.history == [] and model.kv_cache_size() is None


def test_stopping_early_keeps_the_partial_answer(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    session = ChatSession(model, tokenizer, sampling=GREEDY, max_new_tokens=30)
    stream = session.stream("hello world model")
    shown = next(stream)
    stream.close()
    assert session.history == [("hello world model", shown)]


def test_too_long_prompt_is_a_clear_error(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    session = ChatSession(model, tokenizer, sampling=GREEDY, max_length=8)
    with pytest.raises(ValueError, match="max_length 8 leaves no room"):
        session.chat("the quick brown fox jumps over the lazy dog")


def test_seeded_sampling_is_reproducible(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    answers = [ChatSession(model, tokenizer, sampling=SamplingParams.chatglm6b(seed=7), max_new_tokens=10)
               .chat("hello") for _ in range(2)]
    assert answers[0] == answers[1]


def test_reference_snippet_works_after_changing_the_import(tiny_chat_checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_chat_checkpoint), trust_remote_code=True)
    model = AutoModel.from_pretrained(str(tiny_chat_checkpoint), trust_remote_code=True).float()
    model = model.eval()
    torch.manual_seed(0)
    response, history = model.chat(tokenizer, "你好", history=[], max_length=120, do_sample=False)
    assert isinstance(response, str) and history == [("你好", response)]
    streamed = list(model.stream_chat(tokenizer, "hi", history=history, max_length=400, do_sample=False))
    assert streamed[-1][1][:1] == history and streamed[-1][1][1][0] == "hi"


def test_max_length_family_default_marker(model_and_tokenizer) -> None:
    """FAMILY_DEFAULT is the family's reference max_length, None no limit; the marker survives pickling."""
    model, tokenizer = model_and_tokenizer
    assert repr(FAMILY_DEFAULT) == "FAMILY_DEFAULT"
    assert pickle.loads(pickle.dumps(FAMILY_DEFAULT)) is FAMILY_DEFAULT
    assert resolve_max_length(FAMILY_DEFAULT, "glm4v") == 8192 and resolve_max_length(None, "glm4v") is None
    assert resolve_max_length(100, model) == 100
    assert ChatSession(model, tokenizer).max_length == 2048
    assert ChatSession(model, tokenizer, max_length=None).max_length is None
