"""The three reference model cards' snippets, copied verbatim except the import line, the checkpoint path and
the device, run on tiny checkpoints; their greedy answers equal ChatSession's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from visualglm.generation.chat import ChatSession
from visualglm.generation.sampling import SamplingParams
from visualglm.quant.linear import Int4Linear, Int8Linear

from ..conftest import make_png

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


def on_device(model):
    """The cards' ``.half().cuda()``; without a GPU the ChatGLM-6B README's CPU line, ``.float()``."""
    return model.half().cuda() if GPU else model.float()


def test_chatglm6b_card(tiny_chat_checkpoint: Path) -> None:
    path = str(tiny_chat_checkpoint)  # the card: "THUDM/chatglm-6b"
    answers = []
    for _ in range(2):
        torch.manual_seed(0)
        # ---- THUDM/chatglm-6b model card ----
        from visualglm.compat import AutoModel, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        model = on_device(AutoModel.from_pretrained(path, trust_remote_code=True))
        model = model.eval()
        response, history = model.chat(tokenizer, "你好", history=[])
        print(response)
        response, history = model.chat(tokenizer, "晚上睡不着应该怎么办", history=history)
        print(response)
        # ----
        answers.append(history)
    assert answers[0] == answers[1]  # sampled, reproducible under torch.manual_seed
    assert [q for q, _ in history] == ["你好", "晚上睡不着应该怎么办"] and history[1][1] == response

    greedy, history = model.chat(tokenizer, "你好", history=[], do_sample=False)
    session = ChatSession(model.model, tokenizer.tokenizer, sampling=SamplingParams.chatglm6b(do_sample=False))
    assert greedy == session.chat("你好") and history == session.history
    second, history = model.chat(tokenizer, "晚上睡不着应该怎么办", history=history, do_sample=False)
    assert second == session.chat("晚上睡不着应该怎么办") and history == session.history


def test_visualglm6b_card(tiny_visual_checkpoint: Path, tmp_path: Path) -> None:
    path = str(tiny_visual_checkpoint)  # the card: "THUDM/visualglm-6b"
    torch.manual_seed(0)
    # ---- THUDM/visualglm-6b model card ----
    from visualglm.compat import AutoModel, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = on_device(AutoModel.from_pretrained(path, trust_remote_code=True))
    image_path = str(make_png(tmp_path / "photo.png"))  # the card: "your image path"
    response, history = model.chat(tokenizer, image_path, "描述这张图片。", history=[])
    print(response)
    response, history = model.chat(tokenizer, image_path, "这张图片可能是在什么场所拍摄的？", history=history)
    print(response)
    # ----
    assert [q for q, _ in history] == ["描述这张图片。", "这张图片可能是在什么场所拍摄的？"]

    greedy, history = model.chat(tokenizer, image_path, "描述这张图片。", history=[], do_sample=False)
    session = ChatSession(model.model, tokenizer.tokenizer, sampling=SamplingParams.visualglm(do_sample=False),
                          max_length=1024, image=image_path, english=False)
    assert greedy == session.chat("描述这张图片。") and history == session.history
    streamed = list(model.stream_chat(tokenizer, image_path, "这张图片可能是在什么场所拍摄的？", history=history,
                                      do_sample=False))
    assert streamed[-1][0] == session.chat("这张图片可能是在什么场所拍摄的？")
    assert streamed[-1][1] == session.history


@pytest.mark.parametrize("bits", [8, 4])
def test_visualglm6b_quantized_card(tiny_visual_checkpoint: Path, tmp_path: Path, bits: int) -> None:
    path = str(tiny_visual_checkpoint)
    from visualglm.compat import AutoModel, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    # ---- VisualGLM-6B README: "only ChatGLM is quantized; the ViT's quantization error is large" ----
    model = on_device(AutoModel.from_pretrained(path, trust_remote_code=True).quantize(bits))
    # ----
    quantized = Int8Linear if bits == 8 else Int4Linear
    names = [name for name, m in model.model.named_modules() if isinstance(m, quantized)]
    assert names and all(name.startswith("transformer.layers.") for name in names)
    assert not any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.model.image_encoder.modules())
    image_path = str(make_png(tmp_path / "photo.png", (20, 90, 200)))
    response, history = model.chat(tokenizer, image_path, "描述这张图片。", history=[], do_sample=False)
    session = ChatSession(model.model, tokenizer.tokenizer, sampling=SamplingParams.visualglm(do_sample=False),
                          max_length=1024, image=image_path, english=False)
    assert response == session.chat("描述这张图片。")


def _glm4v_card(path: str, image_file: str, dtype: torch.dtype = torch.bfloat16) -> tuple:
    """The card's code; ``dtype`` replaces its ``torch.bfloat16`` where the test says why."""
    from PIL import Image

    # ---- THUDM/glm-4v-9b model card ----
    from visualglm.compat import AutoModelForCausalLM, AutoTokenizer

    device = DEVICE  # the card: "cuda"

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)

    query = '描述这张图片'
    image = Image.open(image_file).convert('RGB')
    inputs = tokenizer.apply_chat_template([{"role": "user", "image": image, "content": query}],
                                           add_generation_prompt=True, tokenize=True, return_tensors="pt",
                                           return_dict=True)  # chat mode

    inputs = inputs.to(device)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        torch_dtype=dtype,  # the card: torch.bfloat16
        low_cpu_mem_usage=True,
        trust_remote_code=True
    ).to(device).eval()

    gen_kwargs = {"max_length": 2500, "do_sample": True, "top_k": 1}
    with torch.no_grad():
        outputs = model.generate(**inputs, **gen_kwargs)
        outputs = outputs[:, inputs['input_ids'].shape[1]:]
        print(tokenizer.decode(outputs[0]))
    # ----
    return tokenizer, model, image, inputs, outputs


def test_glm4v9b_card_answers_as_greedy_chat(glm4v_checkpoint: Path, tmp_path: Path) -> None:
    # In float32: in bfloat16 two logits often tie, top_k=1 then keeps both (as transformers' TopK does) and
    # sampling picks one of them, so the answer is greedy's only up to the first tie.
    image_file = str(make_png(tmp_path / "chart.png", (30, 160, 60)))
    tokenizer, model, image, inputs, outputs = _glm4v_card(str(glm4v_checkpoint), image_file, torch.float32)
    assert set(inputs) == {"input_ids", "attention_mask", "position_ids", "images"}
    assert inputs["images"].shape == (1, 3, 56, 56) and inputs["input_ids"].device.type == DEVICE
    new = outputs[0].tolist()
    stops = set(model.config.stop_ids)
    if new[-1] in stops:  # the reference's decode shows the stop token; chat() leaves it out
        new = new[:-1]
    assert not stops & set(new)
    # top_k=1 leaves one candidate: the same tokens as greedy decoding
    session = ChatSession(model.model, tokenizer.tokenizer, sampling=SamplingParams.glm4v(do_sample=False),
                          max_length=None, max_new_tokens=2500 - inputs["input_ids"].shape[1], image=image)
    assert tokenizer.decode(new).strip() == session.chat("描述这张图片")


@pytest.mark.parametrize("run", [pytest.param("bfloat16", marks=() if GPU else pytest.mark.slow)])
def test_glm4v9b_card_as_published(glm4v_checkpoint: Path, tmp_path: Path, run: str) -> None:
    # bfloat16 runs 20x slower than float32 on CPUs without bf16 matrix units: a slow test there.
    image_file = str(make_png(tmp_path / "chart.png", (30, 160, 60)))
    tokenizer, model, _, inputs, outputs = _glm4v_card(str(glm4v_checkpoint), image_file)
    assert model.dtype == torch.bfloat16 and outputs.device.type == DEVICE
    new = outputs[0].tolist()
    assert 1 <= len(new) <= 2500 - inputs["input_ids"].shape[1]
    stops = set(model.config.stop_ids)
    assert not stops & set(new[:-1]) and (new[-1] in stops or len(new) == 2500 - inputs["input_ids"].shape[1])
    assert isinstance(tokenizer.decode(outputs[0]), str)
