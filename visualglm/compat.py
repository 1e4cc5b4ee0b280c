"""Drop-in names for code written against THUDM's ``trust_remote_code`` models.

Change only the import line of the reference snippet::

    from visualglm.compat import AutoModel, AutoTokenizer   # was: from transformers import ...
    tokenizer = AutoTokenizer.from_pretrained("THUDM/chatglm-6b", trust_remote_code=True)
    model = AutoModel.from_pretrained("THUDM/chatglm-6b", trust_remote_code=True).half().cuda()
    model = model.eval()
    response, history = model.chat(tokenizer, "你好", history=[])
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

    def _session(self, tokenizer, history, max_length, top_p, temperature, do_sample) -> ChatSession:
        sampling = SamplingParams.chatglm6b(top_p=top_p, temperature=temperature, do_sample=do_sample)
        return ChatSession(self.model, tokenizer, sampling=sampling, max_length=max_length,
                           history=[tuple(turn) for turn in (history or [])])

    def chat(self, tokenizer, query: str, history: list | None = None, max_length: int = 2048,
             num_beams: int = 1, do_sample: bool = True, top_p: float = 0.7, temperature: float = 0.95,
             **_ignored: Any) -> tuple[str, list[tuple[str, str]]]:
        if num_beams != 1:
            raise ValueError("beam search is not supported (num_beams must be 1)")
        session = self._session(tokenizer, history, max_length, top_p, temperature, do_sample)
        response = session.chat(query)
        return response, session.history

    def stream_chat(self, tokenizer, query: str, history: list | None = None, max_length: int = 2048,
                    do_sample: bool = True, top_p: float = 0.7, temperature: float = 0.95, **_ignored: Any
                    ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
        """Yields ``(response so far, history including it)`` like the reference."""
        session = self._session(tokenizer, history, max_length, top_p, temperature, do_sample)
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
