"""VisualGLM-6B chat: the image is encoded once per conversation and spliced into every turn."""

from __future__ import annotations

from pathlib import Path

import pytest

import visualglm
from visualglm.generation.chat import ChatSession
from visualglm.generation.sampling import SamplingParams

from ..conftest import make_png

GREEDY = SamplingParams(do_sample=False)


@pytest.fixture(scope="module")
def visual(tiny_visual_checkpoint: Path):
    return visualglm.load(tiny_visual_checkpoint, progress=False), visualglm.load_tokenizer(tiny_visual_checkpoint)


def test_image_is_encoded_once_and_used_every_turn(visual, tmp_path: Path) -> None:
    model, tokenizer = visual
    red = make_png(tmp_path / "red.png")
    session = ChatSession(model, tokenizer, sampling=GREEDY, max_new_tokens=6, image=red)
    first = session.chat("what is this")
    second = session.chat("and the colour")
    assert session.encoded_images == 1
    fresh = ChatSession(model, tokenizer, sampling=GREEDY, max_new_tokens=6, image=red,
                        history=session.history[:1])
    assert fresh.chat("and the colour") == second
    assert len(session.history) == 2 and session.history[0] == ("what is this", first)


def test_the_image_changes_the_answer(visual, tmp_path: Path) -> None:
    model, tokenizer = visual
    answers = set()
    for i, color in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        session = ChatSession(model, tokenizer, sampling=GREEDY, max_new_tokens=8,
                              image=make_png(tmp_path / f"{i}.png", color))
        answers.add(session.chat("describe"))
    assert len(answers) > 1


def test_prompt_layout_with_and_without_image(visual, tmp_path: Path) -> None:
    model, tokenizer = visual
    text_only = ChatSession(model, tokenizer, sampling=GREEDY)
    ids, start = text_only.prompt_ids("你好")
    assert start is None and ids == tokenizer.encode("问：你好\n答：")
    with_image = ChatSession(model, tokenizer, sampling=GREEDY, image=make_png(tmp_path / "a.png"))
    ids, start = with_image.prompt_ids("hi")
    assert ids[start:start + model.config.image_length] == [tokenizer.unk_token_id] * model.config.image_length
    assert ids[:start] == tokenizer.encode("<img>", add_special_tokens=False)


def test_new_image_invalidates_the_cache(visual, tmp_path: Path) -> None:
    model, tokenizer = visual
    session = ChatSession(model, tokenizer, sampling=GREEDY, max_new_tokens=4,
                          image=make_png(tmp_path / "r.png", (255, 0, 0)))
    session.chat("describe")
    session.history.clear()
    session.set_image(make_png(tmp_path / "b.png", (0, 0, 255)))
    prompt_length = len(session.prompt_ids("describe")[0])
    blue = session.chat("describe")
    assert session.last_prefill_tokens == prompt_length  # nothing reused
    fresh = ChatSession(model, tokenizer, sampling=GREEDY, max_new_tokens=4,
                        image=make_png(tmp_path / "b2.png", (0, 0, 255)))
    assert fresh.chat("describe") == blue


def test_images_need_a_visual_model(tiny_chat_checkpoint: Path, tmp_path: Path) -> None:
    model, tokenizer = visualglm.load(tiny_chat_checkpoint, progress=False), visualglm.load_tokenizer(
        tiny_chat_checkpoint)
    with pytest.raises(ValueError, match="no image encoder"):
        ChatSession(model, tokenizer, image=make_png(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="english mode"):
        ChatSession(model, tokenizer, english=True)


def test_bad_image_is_a_clear_error(visual, tmp_path: Path) -> None:
    model, tokenizer = visual
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        ChatSession(model, tokenizer, image=tmp_path / "bad.png")


def test_template_language(visual) -> None:
    model, tokenizer = visual
    forced = ChatSession(model, tokenizer, english=True)
    assert forced.prompt_ids("你好")[0] == tokenizer.encode("Q:你好\nA:")
    assert forced.sampling.banned_ranges == ((63823, 130000),)
    auto = ChatSession(model, tokenizer)
    assert auto.prompt_ids("hi")[0] == tokenizer.encode("Q:hi\nA:")
    assert auto.prompt_ids("你好")[0] == tokenizer.encode("问：你好\nA:".replace("A:", "答："))
    assert not auto.sampling.banned_ranges
    chinese = ChatSession(model, tokenizer, english=False)
    assert chinese.prompt_ids("hi")[0] == tokenizer.encode("问：hi\n答：")


def test_reference_visualglm_snippet(tiny_visual_checkpoint: Path, tmp_path: Path) -> None:
    from visualglm.compat import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_visual_checkpoint), trust_remote_code=True)
    model = AutoModel.from_pretrained(str(tiny_visual_checkpoint), trust_remote_code=True).float().eval()
    image_path = str(make_png(tmp_path / "img.png"))
    response, history = model.chat(tokenizer, image_path, "描述这张图片。", history=[])
    assert isinstance(response, str) and history == [("描述这张图片。", response)]
    response2, history2 = model.chat(tokenizer, image_path, "hi", history=history, do_sample=False,
                                     max_length=2048)
    assert history2[:1] == history and history2[1] == ("hi", response2)
