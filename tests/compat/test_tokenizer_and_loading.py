"""The transformers-style tokenizer calls, ``from_pretrained`` arguments, chat arguments and the model's
dtype/device/quantize chains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from visualglm.compat import AutoModel, AutoModelForCausalLM, AutoTokenizer, BatchEncoding
from visualglm.quant.linear import quantized_bits

from ..conftest import make_png


def test_chatglm_tokenizer_call_encode_decode(tiny_chat_checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_checkpoint, trust_remote_code=True)
    raw = tokenizer.tokenizer
    inputs = tokenizer("你好", return_tensors="pt")
    assert isinstance(inputs, BatchEncoding) and set(inputs) == {"input_ids", "attention_mask"}
    assert inputs.input_ids.tolist() == [raw.encode("你好")]  # ends in [gMASK] <sop>
    assert tokenizer("你好")["input_ids"] == raw.encode("你好") == tokenizer.encode("你好")
    batch = tokenizer(["你好", "hello world again"], padding=True, return_tensors="pt")
    short = len(raw.encode("你好"))
    gap = batch.input_ids.shape[1] - short
    assert batch.attention_mask[0].tolist() == [0] * gap + [1] * short  # padded on the left
    assert batch.input_ids[0, :gap].tolist() == [raw.pad_token_id] * gap
    assert tokenizer.decode(batch.input_ids[0]) == raw.decode(raw.encode("你好"))
    assert tokenizer.batch_decode(batch.input_ids) == [raw.decode(raw.encode(t)) for t in ("你好", "hello world again")]
    with pytest.raises(ValueError, match="pass padding=True"):
        tokenizer(["你好", "hello world again"], return_tensors="pt")
    with pytest.raises(ValueError, match="truncation is not supported"):
        tokenizer("你好", truncation=True, max_length=2)
    with pytest.raises(TypeError, match="text_pair"):
        tokenizer("a", text_pair="b")


def test_chatglm_chat_template_is_its_chat_prompt(tiny_chat_checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_checkpoint)
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                {"role": "user", "content": "再见"}]
    text = "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：再见\n答："
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == tokenizer.encode(text)
    with pytest.raises(ValueError, match="add_generation_prompt=True"):
        tokenizer.apply_chat_template(messages)
    with pytest.raises(ValueError, match="no system role"):
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}, *messages], add_generation_prompt=True)
    with pytest.raises(ValueError, match="takes no images"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x", "image": "a.png"}],
                                      add_generation_prompt=True)


def test_glm4v_chat_template_fields(glm4v_checkpoint: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(glm4v_checkpoint)
    raw = tokenizer.tokenizer
    image = str(make_png(tmp_path / "a.png"))
    messages = [{"role": "user", "image": image, "content": "描述这张图片"}]
    ids, _ = raw.apply_chat_template(messages, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == ids
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt").tolist() == [ids]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        "[gMASK]<sop><|user|>\n描述这张图片<|assistant|>"
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert inputs.input_ids.tolist() == [ids] and inputs.position_ids.tolist() == [list(range(len(ids)))]
    assert inputs.images.shape == (1, 3, 56, 56) and inputs.images.dtype == torch.float32
    assert tokenizer("hi").input_ids == raw.get_prefix_tokens() + raw.encode("hi")
    stop = raw.user_token_id
    assert tokenizer.decode([*raw.encode("ok"), stop]) == "ok<|user|>"
    assert tokenizer.decode(torch.tensor([*raw.encode("ok"), stop]), skip_special_tokens=True) == "ok"
    with pytest.raises(ValueError, match="only one image"):
        tokenizer.apply_chat_template(messages + [{"role": "user", "image": image, "content": "again"}])


def test_from_pretrained_arguments(tiny_chat_checkpoint: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_checkpoint, trust_remote_code=True,
                                                 torch_dtype=torch.bfloat16, low_cpu_mem_usage=True, device_map="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert AutoModel.from_pretrained(tiny_chat_checkpoint, torch_dtype="auto", device_map="auto").dtype == torch.float32
    quantized = AutoModel.from_pretrained(tiny_chat_checkpoint, load_in_8bit=True)
    assert any(quantized_bits(m) == 8 for m in quantized.model.modules())
    with pytest.raises(ValueError, match="several devices"):
        AutoModel.from_pretrained(tiny_chat_checkpoint, device_map={"transformer": 0, "lm_head": "cpu"})
    with pytest.raises(ValueError, match="splits the model"):
        AutoModel.from_pretrained(tiny_chat_checkpoint, device_map="balanced")
    with pytest.raises(TypeError, match="attn_implementation"):
        AutoModel.from_pretrained(tiny_chat_checkpoint, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="quantization_config"):
        AutoModel.from_pretrained(tiny_chat_checkpoint, quantization_config={"load_in_4bit": True})
    with pytest.raises(ValueError, match="padding_side must be 'left'"):
        AutoTokenizer.from_pretrained(tiny_chat_checkpoint, padding_side="right")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            AutoModel.from_pretrained(tiny_chat_checkpoint, device_map="cuda")
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            model.cuda()


def test_quantize_then_half_keeps_the_scales(tiny_visual_checkpoint: Path) -> None:
    for bits in (8, 4):
        model = AutoModel.from_pretrained(tiny_visual_checkpoint).quantize(bits)
        layers = [m for m in model.model.modules() if quantized_bits(m) == bits]
        assert layers
        scales = {id(m): [b.clone() for n, b in m.named_buffers(recurse=False) if n != "bias"] for m in layers}
        assert model.half().eval() is model and model.dtype == torch.float16
        for m in layers:
            kept = [b for n, b in m.named_buffers(recurse=False) if n != "bias"]
            assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(kept, scales[id(m)], strict=True))
        with pytest.raises(ValueError, match="already quantized"):
            model.quantize(bits)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        AutoModel.from_pretrained(tiny_visual_checkpoint).quantize(3)


def test_bad_chat_arguments(tiny_chat_checkpoint: Path, glm4v_checkpoint: Path) -> None:
    model = AutoModel.from_pretrained(tiny_chat_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_checkpoint)
    with pytest.raises(ValueError, match="beam search is not supported"):
        model.chat(tokenizer, "你好", history=[], num_beams=4)
    with pytest.raises(TypeError, match="min_new_tokens"):
        model.chat(tokenizer, "你好", history=[], min_new_tokens=3)
    response, history = model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=3, repetition_penalty=1.1)
    assert history == [("你好", response)]
    glm, glm_tokenizer = AutoModel.from_pretrained(glm4v_checkpoint), AutoTokenizer.from_pretrained(glm4v_checkpoint)
    with pytest.raises(ValueError, match="past_key_values are not supported"):
        next(glm.stream_chat(glm_tokenizer, "hi", past_key_values=object()))
    streamed = list(glm.stream_chat(glm_tokenizer, "hi", history=[], do_sample=False, max_new_tokens=4))
    answer, history = glm.chat(glm_tokenizer, "hi", history=[], do_sample=False, max_new_tokens=4)
    assert streamed[-1] == (answer, history) and history[0] == {"role": "user", "content": "hi"}


def test_glm4v_chat_max_length_counts_the_image_as_its_placeholders(glm4v_checkpoint: Path, tmp_path: Path) -> None:
    # As the reference's generate() sees the prompt: three placeholder ids, not the image's vectors.
    model, tokenizer = AutoModel.from_pretrained(glm4v_checkpoint), AutoTokenizer.from_pretrained(glm4v_checkpoint)
    image = str(make_png(tmp_path / "p.png"))
    shown = len(tokenizer.apply_chat_template([{"role": "user", "image": image, "content": "hi"}],
                                              add_generation_prompt=True))
    assert model.model.image_tokens > 3
    with pytest.raises(ValueError, match=f"max_length {shown} leaves no room to answer a prompt of {shown} tokens"):
        model.chat(tokenizer, "hi", history=[], image=image, max_length=shown)
    streamed = list(model.stream_chat(tokenizer, "hi", history=[], image=image, max_length=shown + 2,
                                      do_sample=False))
    answer, _ = model.chat(tokenizer, "hi", history=[], image=image, max_new_tokens=2, do_sample=False)
    assert streamed[-1][0] == answer


def test_tokenizer_without_config_takes_the_text_family_of_its_class(tiny_chat_checkpoint: Path,
                                                                     tmp_path: Path) -> None:
    import shutil

    from visualglm.compat.auto import tokenizer_family

    directory = tmp_path / "tokenizer-only"
    directory.mkdir()
    for path in tiny_chat_checkpoint.iterdir():
        if path.name != "config.json" and not path.name.endswith(".safetensors"):
            shutil.copy(path, directory / path.name)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    spec = tokenizer_family(tokenizer.tokenizer)
    # ChatGLM-6B and VisualGLM-6B share the tokenizer class: the text-only family is taken.
    assert not spec.multimodal and isinstance(tokenizer.tokenizer, spec.tokenizer_class)
    assert tokenizer.spec is spec and tokenizer.family == spec.name
    with pytest.raises(ValueError, match="no model family uses a object tokenizer"):
        tokenizer_family(object())


def test_every_family_describes_its_reference_api() -> None:
    from visualglm.compat.chat import SIGNATURES
    from visualglm.families import FAMILIES

    for spec in FAMILIES.values():
        assert spec.hf_chat in SIGNATURES
        assert spec.hf_tokenizer_template or spec.hf_prompt_text is not None
        # A multimodal family either is told where its image goes or finds its placeholder itself.
        assert (spec.hf_image_prompt is not None) + (spec.image_placeholders is not None) == spec.multimodal
