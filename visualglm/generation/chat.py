"""Chat sessions: history, the reference prompt template, streaming text, and KV-cache reuse.

Between turns the session keeps the model's KV cache and the tokens it holds. A new turn prefills only
what the model says is still exact (``model.reusable_prefix``). For ChatGLM-6B's template this is the whole
prompt when it did not change (e.g. regenerating an answer) and nothing when the history grew: every turn
puts the history into the bidirectional prefix, whose keys/values depend on all of it, so reusing them would
change the answers (tests/generation/test_chat.py shows the difference).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from visualglm.generation.detok import DecodeStream
from visualglm.generation.engine import GenerationParams, compile_decode, generate_steps
from visualglm.generation.sampling import SamplingParams, make_generator
from visualglm.tokenizers.templates import chatglm_prompt


class ChatSession:
    """A conversation with a ChatGLM-6B-family model.

    ``history`` is the reference's list of ``(query, response)`` pairs. Defaults follow the reference
    ``chat()``: ``max_length`` 2048 (prompt + answer), sampling with top_p 0.7, temperature 0.95.
    """

    def __init__(self, model: nn.Module, tokenizer, *, sampling: SamplingParams | None = None,
                 max_length: int | None = 2048, max_new_tokens: int | None = None,
                 history: list[tuple[str, str]] | None = None, compile: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = (sampling or SamplingParams.chatglm6b()).validate()
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.history: list[tuple[str, str]] = [tuple(turn) for turn in (history or [])]
        self._generator = make_generator(self.sampling.seed, next(model.parameters()).device)
        self._cached_ids: list[int] = []  # tokens whose keys/values sit in the model's cache slots 0..n-1
        self.last_prefill_tokens = 0  # how many prompt tokens the last turn actually computed
        # Optional torch.compile'd decode step (fixed shapes; the cache is then sized to the context).
        self._compiled = compile_decode(model) if compile else None

    def reset(self) -> None:
        """Forget the history and the cache."""
        self.history = []
        self._cached_ids = []
        self.model.delete_kv_cache()

    def prompt_ids(self, query: str) -> list[int]:
        return self.tokenizer.encode(chatglm_prompt(query, self.history))

    def stream(self, query: str) -> Iterator[str]:
        """Yield the answer as text deltas; the turn is added to ``history`` when the stream ends (also
        when the caller stops early, with the text shown so far)."""
        ids = self.prompt_ids(query)
        reuse = self.model.reusable_prefix(self._cached_ids, ids) if self._cached_ids else 0
        params = GenerationParams(max_new_tokens=self.max_new_tokens, max_length=self.max_length,
                                  stop_ids=(self.model.config.eos_token_id,), sampling=self.sampling)
        decoded = DecodeStream(self.tokenizer, postprocess="chatglm")
        chosen: list[int] = []
        self._cached_ids = []  # invalid while the cache is being rewritten
        self.last_prefill_tokens = len(ids) - reuse
        try:
            for step in generate_steps(self.model, [ids], params=params, generator=self._generator,
                                       reuse_prefix=reuse, keep_cache=True, compiled=self._compiled):
                token = int(step.tokens[0])
                chosen.append(token)
                if bool(step.finished[0]):
                    break
                delta = decoded.push(token)
                if delta:
                    yield delta
            tail = decoded.flush()
            if tail:
                yield tail
        finally:
            # Every chosen token but the last was fed back, so its keys/values are cached. With no token
            # chosen the prefill itself may have been interrupted: trust nothing.
            self._cached_ids = ids + chosen[:-1] if chosen else []
            self.history.append((query, decoded.text))

    def chat(self, query: str) -> str:
        """The whole answer to ``query`` (and the turn appended to ``history``)."""
        return "".join(self.stream(query))


@torch.inference_mode()
def regenerate(session: ChatSession) -> str:
    """Answer the last query again (a new sample), reusing the cached prompt."""
    if not session.history:
        raise ValueError("nothing to regenerate: the history is empty")
    query, _ = session.history.pop()
    return session.chat(query)
