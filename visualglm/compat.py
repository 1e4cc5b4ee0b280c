"""Drop-in names for code written against THUDM's ``trust_remote_code`` models.

Change only the import line of the reference snippet::

    from visualglm.compat import AutoModel, AutoTokenizer   # was: from transformers import ...
    tokenizer = AutoTokenizer.from_pretrained("THUDM/chatglm-6b", trust_remote_code=True)
    model = AutoModel.from_pretrained("THUDM/chatglm-6b", trust_remote_code=True).half().cuda()
    model = model.eval()
    response, history = model.chat(tokenizer, "你好", history=[])

VisualGLM-6B's snippet works the same way: ``model.chat(tokenizer, image_path, "描述这张图片。", history=[])``,
and GLM-4V-9B's: ``model.chat(tokenizer, "描述这张图片。", history=[], image=pil_image)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from visualglm.checkpoint.load import load
from visualglm.checkpoint.tokenizer import load_tokenizer
from visualglm.generation.chat import ChatSession
from visualglm.generation.sampling import SamplingParams


class CompatModel:
    """Wraps a loaded model with the reference's ``chat``/``stream_chat`` and dtype/device helpers."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.config = model.config

    def half(self) -> CompatModel:
        self.model.half()
        return self

    def float(self) -> CompatModel:
        self.model.float()
        return self

    def bfloat16(self) -> CompatModel:
        self.model.bfloat16()
        return self

    def cuda(self, device: Any = None) -> CompatModel:
        self.model.cuda(device)
        return self

    def to(self, *args: Any, **kwargs: Any) -> CompatModel:
        self.model.to(*args, **kwargs)
        return self

    def eval(self) -> CompatModel:
        self.model.eval()
        return self

    def _session(self, tokenizer, history, max_length, sampling: SamplingParams, image=None) -> ChatSession:
        # The HF VisualGLM code always uses the Chinese template (no English option).
        english = False if hasattr(self.model, "encode_images") else None
        return ChatSession(self.model, tokenizer, sampling=sampling, max_length=max_length,
                           history=[tuple(turn) for turn in (history or [])], image=image, english=english)

    def chat(self, tokenizer, *args: Any, **kwargs: Any) -> tuple[str, list[tuple[str, str]]]:
        """ChatGLM-6B: ``chat(tokenizer, query, history=None, max_length=2048, num_beams=1, do_sample=True,
        top_p=0.7, temperature=0.95)``. VisualGLM-6B: ``chat(tokenizer, image_path, query, history=None,
        max_length=1024, min_length=100, do_sample=True, top_p=0.4, top_k=100, temperature=0.8,
        repetition_penalty=1.2)``; ``min_length`` is not applied (see README)."""
        family = self.config.family
        if family == "glm4v":
            return self._glm4v_chat(tokenizer, *args, **kwargs)
        if family == "visualglm":
            return self._visual_chat(tokenizer, *args, **kwargs)
        return self._text_chat(tokenizer, *args, **kwargs)

    def _glm4v_chat(self, tokenizer, query: str, history: list | None = None, role: str = "user", image: Any = None,
                    max_length: int = 8192, num_beams: int = 1, do_sample: bool = True, top_p: float = 0.8,
                    temperature: float = 0.8, **_ignored: Any) -> tuple[str, list[dict]]:
        """GLM-4V-9B: history is the reference's list of message dicts; the caller's list is not mutated
        (the reference appends to it in place) and a new list is returned."""
        if num_beams != 1:
            raise ValueError("beam search is not supported (num_beams must be 1)")
        if role != "user":
            raise ValueError("only role='user' queries are supported (GLM-4V-9B has no tools or system role)")
        history = [dict(m) for m in (history or [])]
        pairs, pending = [], None
        for message in history:
            if image is None and message.get("image") is not None:
                image = message["image"]
            if message.get("role") == "user":
                pending = message.get("content", "")
            elif message.get("role") == "assistant" and pending is not None:
                pairs.append((pending, message.get("content", "")))
                pending = None
        sampling = SamplingParams.glm4v(top_p=top_p, temperature=temperature, do_sample=do_sample)
        session = ChatSession(self.model, tokenizer, sampling=sampling, max_length=max_length, history=pairs,
                              image=image)
        response = session.chat(query)
        user = {"role": "user", "content": query}
        if image is not None and not any(m.get("image") is not None for m in history):
            user["image"] = image
        return response, history + [user, {"role": "assistant", "metadata": "", "content": response}]

    def _text_chat(self, tokenizer, query: str, history: list | None = None, max_length: int = 2048,
                   num_beams: int = 1, do_sample: bool = True, top_p: float = 0.7, temperature: float = 0.95,
                   **_ignored: Any) -> tuple[str, list[tuple[str, str]]]:
        if num_beams != 1:
            raise ValueError("beam search is not supported (num_beams must be 1)")
        sampling = SamplingParams.chatglm6b(top_p=top_p, temperature=temperature, do_sample=do_sample)
        session = self._session(tokenizer, history, max_length, sampling)
        response = session.chat(query)
        return response, session.history

    def _visual_chat(self, tokenizer, image_path: Any, query: str, history: list | None = None,
                     max_length: int = 1024, min_length: int = 100, do_sample: bool = True, top_p: float = 0.4,
                     top_k: int = 100, temperature: float = 0.8, repetition_penalty: float = 1.2,
                     **_ignored: Any) -> tuple[str, list[tuple[str, str]]]:
        sampling = SamplingParams.visualglm(top_p=top_p, top_k=top_k, temperature=temperature,
                                            repetition_penalty=repetition_penalty, do_sample=do_sample)
        session = self._session(tokenizer, history, max_length, sampling, image=image_path or None)
        response = session.chat(query)
        return response, session.history

    def stream_chat(self, tokenizer, query: str, history: list | None = None, max_length: int = 2048,
                    do_sample: bool = True, top_p: float = 0.7, temperature: float = 0.95, **_ignored: Any
                    ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
        """Yields ``(response so far, history including it)`` like the reference (ChatGLM-6B)."""
        sampling = SamplingParams.chatglm6b(top_p=top_p, temperature=temperature, do_sample=do_sample)
        session = self._session(tokenizer, history, max_length, sampling)
        earlier = list(session.history)
        response = ""
        for delta in session.stream(query):
            response += delta
            yield response, earlier + [(query, response)]


class AutoModel:
    @staticmethod
    def from_pretrained(path_or_name: str, trust_remote_code: bool = False, **kwargs: Any) -> CompatModel:
        """Load like ``visualglm.load`` (``trust_remote_code`` is accepted and ignored: no remote code runs)."""
        return CompatModel(load(path_or_name, dtype=kwargs.get("torch_dtype"), progress=True))


class AutoTokenizer:
    @staticmethod
    def from_pretrained(path_or_name: str, trust_remote_code: bool = False, **_kwargs: Any):
        return load_tokenizer(path_or_name)
