"""``model.generate``: transformers' length and sampling arguments, batches equal to each prompt alone, images
for both multimodal families, and clear errors for what it does not do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from visualglm.compat import AutoModel, AutoTokenizer
from visualglm.generation.chat import ChatSession
from visualglm.generation.detok import postprocess_chatglm
from visualglm.generation.sampling import SamplingParams

from ..conftest import make_png

TEXTS = ["你好", "the quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def chatglm(tiny_chat_checkpoint: Path):
    return AutoModel.from_pretrained(tiny_chat_checkpoint), AutoTokenizer.from_pretrained(tiny_chat_checkpoint)


@pytest.fixture(scope="module")
def visual(tiny_visual_checkpoint: Path):
    return AutoModel.from_pretrained(tiny_visual_checkpoint), AutoTokenizer.from_pretrained(tiny_visual_checkpoint)


@pytest.fixture(scope="module")
def glm4v(glm4v_checkpoint: Path):
    return AutoModel.from_pretrained(glm4v_checkpoint), AutoTokenizer.from_pretrained(glm4v_checkpoint)


def new_ids(out: torch.Tensor, inputs) -> list[list[int]]:
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def assert_batch_equals_alone(batch: list[list[int]], alone: list[list[int]], pad: int) -> None:
    """Each row's new ids are the prompt's own when generated alone, then pad ids once it stopped."""
    assert max(len(a) for a in alone) == len(batch[0])  # the call ends when the last row stops
    for row, own in zip(batch, alone, strict=True):
        assert row[:len(own)] == own
        assert all(t == pad for t in row[len(own):])


def test_text_batch_equals_each_prompt_alone_and_rows_that_stop_early_are_padded(chatglm) -> None:
    model, tokenizer = chatglm
    free = [new_ids(model.generate(**tokenizer(t, return_tensors="pt"), max_new_tokens=8, eos_token_id=[]),
                    tokenizer(t, return_tensors="pt"))[0] for t in TEXTS]
    stop = free[0][2]  # the first prompt then stops after 3 tokens
    assert stop not in free[1][:4]
    alone = []
    for text in TEXTS:
        inputs = tokenizer(text, return_tensors="pt")
        alone.append(new_ids(model.generate(**inputs, max_new_tokens=8, eos_token_id=stop), inputs)[0])
    assert len(alone[0]) == 3 and alone[0][-1] == stop and len(alone[1]) > 3
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=8, eos_token_id=stop)
    assert torch.equal(out[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])  # the input comes back as given
    assert_batch_equals_alone(new_ids(out, inputs), alone, tokenizer.pad_token_id)


def test_greedy_generate_equals_chat(chatglm) -> None:
    model, tokenizer = chatglm
    inputs = tokenizer("你好", return_tensors="pt")
    out = model.generate(**inputs, max_length=200)  # no generation_config.json: greedy, as transformers
    session = ChatSession(model.model, tokenizer.tokenizer, sampling=SamplingParams(do_sample=False), max_length=200)
    assert postprocess_chatglm(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])) == session.chat("你好")


def test_length_arguments_have_transformers_meanings(chatglm) -> None:
    model, tokenizer = chatglm
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    width = inputs["input_ids"].shape[1]
    never = {"eos_token_id": []}  # no stop id: every row runs to its budget
    assert model.generate(**inputs, max_new_tokens=5, **never).shape == (2, width + 5)
    assert model.generate(**inputs, max_length=width + 4, **never).shape == (2, width + 4)  # counts the input
    assert model.generate(**inputs, max_length=width + 4, max_new_tokens=2, **never).shape == (2, width + 2)
    assert model.generate(**inputs, **never).shape == (2, 20)  # transformers' default max_length
    with pytest.raises(ValueError, match="max_length=5 leaves no room"):
        model.generate(**inputs, max_length=5)


def test_sampling_follows_torch_manual_seed(chatglm) -> None:
    model, tokenizer = chatglm
    inputs = tokenizer("你好", return_tensors="pt")
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(model.generate(**inputs, max_new_tokens=30, do_sample=True, temperature=1.5, eos_token_id=[]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_generation_config_json_gives_the_defaults(tiny_chat_checkpoint: Path, tmp_path: Path) -> None:
    import json
    import shutil

    directory = tmp_path / "with-generation-config"
    shutil.copytree(tiny_chat_checkpoint, directory)
    (directory / "generation_config.json").write_text(json.dumps({"max_length": 31, "eos_token_id": []}))
    model, tokenizer = AutoModel.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    assert model.generate(**tokenizer("你好", return_tensors="pt")).shape == (1, 31)


def test_visualglm_image_inputs_batch_and_chat(visual, tmp_path: Path) -> None:
    model, tokenizer = visual
    red, blue = make_png(tmp_path / "r.png", (250, 0, 0)), make_png(tmp_path / "b.png", (0, 0, 250))
    inputs = model.build_inputs_with_image(tokenizer, str(red), "描述这张图片。")
    out = model.generate(**inputs, max_length=1024, do_sample=False, repetition_penalty=1.2)  # as its chat()
    session = ChatSession(model.model, tokenizer.tokenizer, sampling=SamplingParams.visualglm(do_sample=False),
                          max_length=1024, image=str(red), english=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
    assert postprocess_chatglm(text) == session.chat("描述这张图片。")

    conversations = [[{"role": "user", "content": "描述这张图片。", "image": str(red)}],
                     [{"role": "user", "content": "what colour is the big shape in this picture", "image": str(blue)}]]
    alone = []
    for conversation in conversations:
        single = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        alone.append(new_ids(model.generate(**single, max_new_tokens=12), single)[0])
    assert alone[0] == new_ids(model.generate(**inputs, max_new_tokens=12), inputs)[0]  # same prompt both ways
    batch = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True, padding=True)
    assert batch["images"].shape == (2, 3, 224, 224) and isinstance(batch["pre_image_length"], int)
    assert_batch_equals_alone(new_ids(model.generate(**batch, max_new_tokens=12), batch), alone,
                              tokenizer.pad_token_id)


def test_glm4v_batch_with_and_without_an_image_equals_each_alone(glm4v, tmp_path: Path) -> None:
    from PIL import Image

    model, tokenizer = glm4v
    image = Image.open(make_png(tmp_path / "g.png", (20, 200, 40)))
    conversations = [[{"role": "user", "content": "hi, who are you and what can you do for me today?"}],
                     [{"role": "user", "image": image, "content": "描述这张图片"}]]
    alone = []
    for conversation in conversations:
        single = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                               return_tensors="pt", return_dict=True)
        alone.append(new_ids(model.generate(**single, max_new_tokens=10, do_sample=False), single)[0])
    batch = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                          return_tensors="pt", return_dict=True, padding=True)
    assert batch["images"].shape == (1, 3, 56, 56)  # one image, for the second row
    out = model.generate(**batch, max_new_tokens=10, do_sample=False)
    assert_batch_equals_alone(new_ids(out, batch), alone, tokenizer.pad_token_id)


def test_streamer_gets_the_input_then_each_step(chatglm) -> None:
    model, tokenizer = chatglm
    inputs = tokenizer("你好", return_tensors="pt")

    class Recorder:
        def __init__(self) -> None:
            self.puts, self.ended = [], False

        def put(self, value: torch.Tensor) -> None:
            self.puts.append(value.tolist())

        def end(self) -> None:
            self.ended = True

    streamer = Recorder()
    out = model.generate(**inputs, max_new_tokens=6, eos_token_id=[], streamer=streamer)
    assert streamer.puts[0] == inputs["input_ids"].tolist() and streamer.ended
    assert [step[0] for step in streamer.puts[1:]] == out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"num_beams": 4}, ValueError, "beam search is not supported"),
    ({"num_return_sequences": 2}, ValueError, "num_return_sequences=2"),
    ({"min_new_tokens": 5}, ValueError, "min_new_tokens=5"),
    ({"no_repeat_ngram_size": 3}, ValueError, "no_repeat_ngram_size=3"),
    ({"output_scores": True, "return_dict_in_generate": True}, ValueError, "output_scores=True"),
    ({"logits_processor": [object()]}, ValueError, "logits_processor"),
    ({"frobnicate": 1}, TypeError, "frobnicate"),
    ({"do_sample": True, "temperature": 0.0}, ValueError, "temperature must be > 0"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be an integer >= 1"),
])
def test_bad_generate_arguments_are_clear_errors(chatglm, kwargs: dict, error: type, match: str) -> None:
    model, tokenizer = chatglm
    with pytest.raises(error, match=match):
        model.generate(**tokenizer("你好", return_tensors="pt"), **kwargs)


def test_arguments_that_change_nothing_are_accepted(chatglm) -> None:
    model, tokenizer = chatglm
    inputs = tokenizer("你好", return_tensors="pt")
    plain = model.generate(**inputs, max_new_tokens=4)
    same = model.generate(**inputs, max_new_tokens=4, num_beams=1, use_cache=False, length_penalty=2.0,
                          logits_processor=[], output_scores=False, top_k=3, temperature=0.3)  # greedy ignores
    assert torch.equal(plain, same)


def test_bad_inputs_are_clear_errors(chatglm, glm4v, tmp_path: Path) -> None:
    model, tokenizer = chatglm
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    right = inputs["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="only left padding is supported"):
        model.generate(input_ids=inputs["input_ids"], attention_mask=right, max_new_tokens=2)
    with pytest.raises(ValueError, match="ChatGLM-6B takes no images"):
        model.generate(**inputs, images=torch.zeros(2, 3, 224, 224), pre_image_length=1)
    with pytest.raises(ValueError, match="needs input_ids"):
        model.generate(max_new_tokens=2)
    glm, glm_tokenizer = glm4v
    with_image = glm_tokenizer.apply_chat_template(
        [{"role": "user", "image": str(make_png(tmp_path / "x.png")), "content": "hi"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with pytest.raises(ValueError, match="hold an image placeholder but no images"):
        glm.generate(input_ids=with_image["input_ids"], max_new_tokens=2)
    shifted = with_image["position_ids"] + 1
    with pytest.raises(ValueError, match="custom position_ids are not supported"):
        glm.generate(**{**with_image, "position_ids": shifted}, max_new_tokens=2)
