"""GLM-4V-9B chat: template, image once, stop ids, and exact KV reuse across turns (causal attention)."""

from __future__ import annotations

from pathlib import Path

import pytest

import visualglm
from visualglm.generation.chat import ChatSession
from visualglm.generation.sampling import SamplingParams

from ..conftest import make_png

GREEDY = SamplingParams(do_sample=False)


@pytest.fixture(scope="module")
def glm4v(glm4v_checkpoint: Path):
    return visualglm.load(glm4v_checkpoint, progress=False), visualglm.load_tokenizer(glm4v_checkpoint)


def test_defaults_follow_the_reference(glm4v) -> None:
    model, tokenizer = glm4v
    session = ChatSession(model, tokenizer)
    assert (session.sampling.top_p, session.sampling.temperature, session.max_length) == (0.8, 0.8, 8192)
    assert session.sampling.invalid_score_forced_id == 198
    with pytest.raises(ValueError, match="english mode"):
        ChatSession(model, tokenizer, english=True)


def test_image_prompt_is_expanded_and_encoded_once(glm4v, tmp_path: Path) -> None:
    model, tokenizer = glm4v
    session = ChatSession(model, tokenizer, sampling=GREEDY, max_new_tokens=5, image=make_png(tmp_path / "a.png"))
    ids, start = session.prompt_ids("Describe this image.")
    width = model.config.vision_config.num_image_tokens
    assert ids[start] == model.config.boi_token_id and ids[start + width + 1] == model.config.eoi_token_id
    session.chat("Describe this image.")
    session.chat("And the colours?")
    assert session.encoded_images == 1


def test_later_turns_reuse_the_cache_and_equal_reencoding(glm4v, tmp_path: Path) -> None:
    model, tokenizer = glm4v
    image = make_png(tmp_path / "b.png", (10, 200, 40))
    session = ChatSession(model, tokenizer, sampling=GREEDY, max_new_tokens=6, image=image)
    session.chat("Describe this image.")
    second_prompt = len(session.prompt_ids("What else?")[0])
    second = session.chat("What else?")
    assert session.last_prefill_tokens < second_prompt  # the first turn's slots were reused
    fresh = ChatSession(model, tokenizer, sampling=GREEDY, max_new_tokens=6, image=image,
                        history=session.history[:1])
    assert fresh.chat("What else?") == second
    assert fresh.last_prefill_tokens == second_prompt


def test_text_only_chat(glm4v) -> None:
    model, tokenizer = glm4v
    session = ChatSession(model, tokenizer, sampling=GREEDY, max_new_tokens=4)
    ids, start = session.prompt_ids("hello")
    assert start is None and model.config.boi_token_id not in ids
    assert isinstance(session.chat("hello"), str)


def test_reference_glm4v_snippet_without_mutating_history(glm4v_checkpoint: Path, tmp_path: Path) -> None:
    from PIL import Image

    from visualglm.compat import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(glm4v_checkpoint), trust_remote_code=True)
    model = AutoModel.from_pretrained(str(glm4v_checkpoint), trust_remote_code=True).eval()
    image = Image.new("RGB", (30, 20), (0, 0, 200))
    history: list = []
    response, new_history = model.chat(tokenizer, "描述这张图片。", history=history, image=image, do_sample=False,
                                       max_length=64)
    assert history == []  # the reference mutates the caller's list; we do not
    assert new_history[0] == {"role": "user", "content": "描述这张图片。", "image": image}
    assert new_history[1]["content"] == response
    again, _ = model.chat(tokenizer, "描述这张图片。", history=[], image=image, do_sample=False, max_length=64)
    assert again == response


def test_cli_ask_with_an_image(glm4v_checkpoint: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    image = make_png(tmp_path / "c.png")
    result = subprocess.run([sys.executable, "-m", "visualglm", "ask", "--model", str(glm4v_checkpoint), "--image",
                             str(image), "--greedy", "--max-new-tokens", "4", "Describe this image."],
                            capture_output=True, text=True, timeout=120, check=False, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
