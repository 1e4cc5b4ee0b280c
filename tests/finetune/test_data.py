"""Data formats, validation messages, inference templates and label masking."""

from __future__ import annotations

import json

import pytest

import visualglm
from tests.conftest import make_png
from visualglm.finetune.data import IGNORE_INDEX, DataError, collate, load_examples, read_conversations


@pytest.fixture(scope="module")
def visual(tiny_visual_checkpoint):
    return visualglm.load_tokenizer(tiny_visual_checkpoint), visualglm.load(tiny_visual_checkpoint, progress=False)


def _write(path, rows, jsonl=False):
    text = "\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows)
    path.write_text(text, encoding="utf-8")
    return path


def test_reference_format_uses_the_chat_template_and_masks_the_prompt(tmp_path, visual) -> None:
    from visualglm.generation.chat import ChatSession

    tokenizer, model = visual
    make_png(tmp_path / "red.png")
    data = _write(tmp_path / "d.json", [{"img": "red.png", "prompt": "What color?", "label": "red"},
                                        {"prompt": "你好", "label": "好"}])
    examples, cut = load_examples(data, tokenizer, model.config)
    assert cut == 0 and len(examples) == 2
    session = ChatSession(model, tokenizer)
    session.set_image(tmp_path / "red.png")
    prompt, start = session.prompt_ids("What color?")
    first = examples[0]
    assert first.input_ids[: len(prompt)] == prompt and first.image_start == start
    answer = tokenizer.encode("red", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert first.input_ids[len(prompt):] == answer
    assert first.labels == [IGNORE_INDEX] * len(prompt) + answer  # the stop token is a label
    session.reset()
    assert examples[1].input_ids[: len(session.prompt_ids("你好")[0])] == session.prompt_ids("你好")[0]
    assert examples[1].image is None and examples[1].image_start is None
    batch = collate(examples, tokenizer.pad_token_id, (224, 224))
    assert batch.input_ids.shape[0] == 2 and batch.pixel_values.shape == (1, 3, 224, 224)
    assert batch.image_rows == [0] and batch.label_tokens == len(answer) + len(examples[1].input_ids) - len(
        session.prompt_ids("你好")[0])


def test_chat_jsonl_gives_one_example_per_answer_with_history(tmp_path, visual) -> None:
    tokenizer, model = visual
    data = _write(tmp_path / "c.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "yes"}]}], jsonl=True)
    examples, _ = load_examples(data, tokenizer, model.config)
    assert len(examples) == 2
    from visualglm.tokenizers.templates import visualglm_ids

    prompt, _ = visualglm_ids(tokenizer, "again", [("hi", "hello")], image_length=None, english=True)
    assert examples[1].input_ids[: len(prompt)] == prompt


@pytest.mark.parametrize(("rows", "jsonl", "message"), [
    ([{"prompt": "a", "label": "b"}, {"img": "missing.png", "prompt": "a", "label": "b"}], False,
     "row 2: image file"),
    ([{"prompt": "a"}], False, "row 1: 'label' must be a non-empty string"),
    ([{"prompt": "a", "label": "b", "answer": "c"}], False, "unknown field"),
    ([{"messages": [{"role": "user", "content": "a"}]}], True, "line 1: the last message must be the assistant"),
    ([{"messages": [{"role": "assistant", "content": "a"}]}], True, "alternate user, assistant"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "image": "x.png"}]}],
     True, "only allowed in the first user message"),
])
def test_validation_names_file_row_and_problem(tmp_path, rows, jsonl, message) -> None:
    path = _write(tmp_path / ("d.jsonl" if jsonl else "d.json"), rows, jsonl)
    with pytest.raises(DataError, match=message) as info:
        read_conversations(path)
    assert str(path) in str(info.value)


def test_model_specific_checks(tmp_path, visual, tiny_chat_checkpoint) -> None:
    tokenizer, model = visual
    make_png(tmp_path / "red.png")
    long = _write(tmp_path / "long.json", [{"prompt": "word " * 200, "label": "b"}])
    with pytest.raises(DataError, match="max_source_length"):
        load_examples(long, tokenizer, model.config, max_source_length=64)
    cut, n = load_examples(_write(tmp_path / "cut.json", [{"prompt": "a", "label": "word " * 50}]), tokenizer,
                           model.config, max_target_length=8)
    assert n == 1 and len(cut[0].input_ids) - cut[0].labels.count(IGNORE_INDEX) == 8
    assert cut[0].input_ids[-1] == tokenizer.eos_token_id
    text_model = visualglm.load(tiny_chat_checkpoint, progress=False)
    with pytest.raises(DataError, match="text-only"):
        load_examples(_write(tmp_path / "i.json", [{"img": "red.png", "prompt": "a", "label": "b"}]),
                      visualglm.load_tokenizer(tiny_chat_checkpoint), text_model.config)


def test_glm4v_chat_template_expands_the_image_and_trains_the_stop_token(tmp_path, glm4v_checkpoint) -> None:
    tokenizer = visualglm.load_tokenizer(glm4v_checkpoint)
    config = visualglm.load(glm4v_checkpoint, progress=False).config
    make_png(tmp_path / "red.png")
    data = _write(tmp_path / "c.jsonl", [{"messages": [
        {"role": "user", "content": "what?", "image": "red.png"}, {"role": "assistant", "content": "red"}]}], True)
    (example,), _ = load_examples(data, tokenizer, config)
    messages = [{"role": "user", "content": "what?", "image": True}]
    prompt, _ = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    width = config.vision_config.num_image_tokens
    assert len(example.input_ids) == len(prompt) - 1 + width + len(tokenizer.encode("\n") + tokenizer.encode("red")) + 1
    assert example.input_ids[-1] == tokenizer.user_token_id and example.labels[-1] == tokenizer.user_token_id
    boi = example.input_ids.index(config.boi_token_id)
    assert example.image_start == boi and example.input_ids[boi + width + 1] == config.eoi_token_id
    answer_start = len(prompt) - 1 + width - 1  # the <|assistant|> role token is the first label
    assert all(y == IGNORE_INDEX for y in example.labels[:answer_start])
    assert example.labels[answer_start] == tokenizer.assistant_token_id
