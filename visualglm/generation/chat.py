"""Chat sessions: history, the reference prompt templates, images, streaming text, and KV-cache reuse.

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
from visualglm.generation.sampling import VISUALGLM_ENGLISH_BANNED_RANGES, SamplingParams, make_generator
from visualglm.image import load_image, preprocess
from visualglm.tokenizers.templates import chatglm_prompt, visualglm_ids


class ChatSession:
    """A conversation with ChatGLM-6B or VisualGLM-6B.

    ``history`` is the reference's list of ``(query, response)`` pairs. Defaults follow the reference
    chat functions: ``max_length`` 2048 (prompt + answer); ChatGLM-6B samples with top_p 0.7 and
    temperature 0.95, VisualGLM-6B with its demo's top_p 0.4, top_k 100, temperature 0.8 and repetition
    penalty 1.2. A VisualGLM session may hold one image (``set_image``), encoded once and reused by every
    turn. VisualGLM's template language: ``english=None`` picks ``Q:/A:`` for a query without CJK characters
    and ``问：/答：`` otherwise (as its web demo); ``english=True`` forces ``Q:/A:`` and bans the Chinese pieces
    (its ``--english``); ``english=False`` forces Chinese.
    """

    def __init__(self, model: nn.Module, tokenizer, *, sampling: SamplingParams | None = None,
                 max_length: int | None = 2048, max_new_tokens: int | None = None,
                 history: list[tuple[str, str]] | None = None, compile: bool = False,
                 image=None, english: bool | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.multimodal = hasattr(model, "encode_images")
        if english is not None and not self.multimodal:
            raise ValueError("english mode is a VisualGLM-6B option")
        self.english = english
        if sampling is None:
            sampling = SamplingParams.visualglm() if self.multimodal else SamplingParams.chatglm6b()
            if english:
                sampling = sampling.replace(banned_ranges=VISUALGLM_ENGLISH_BANNED_RANGES)
        self.sampling = sampling.validate()
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.history: list[tuple[str, str]] = [tuple(turn) for turn in (history or [])]
        self._generator = make_generator(self.sampling.seed, next(model.parameters()).device)
        self._cached_ids: list[int] = []  # tokens whose keys/values sit in the model's cache slots 0..n-1
        self.last_prefill_tokens = 0  # how many prompt tokens the last turn actually computed
        # Optional torch.compile'd decode step (fixed shapes; the cache is then sized to the context).
        self._compiled = compile_decode(model) if compile else None
        self._image_embeds: torch.Tensor | None = None  # [1, image_length, hidden], encoded once
        self.encoded_images = 0  # how many times the vision tower ran
        if image is not None:
            self.set_image(image)

    @torch.inference_mode()
    def set_image(self, image, allow_remote: bool = False) -> None:
        """Attach an image (anything ``visualglm.image.load_image`` accepts; http(s) URLs only with
        ``allow_remote``) to the conversation."""
        if not self.multimodal:
            raise ValueError("this model has no image encoder: images need a VisualGLM-6B checkpoint")
        size = self.model.config.eva_config.image_size
        device = next(self.model.parameters()).device
        pixels = preprocess(load_image(image, allow_remote=allow_remote), (size[0], size[1])).to(device)
        self._image_embeds = self.model.encode_images(pixels)
        self.encoded_images += 1
        self._cached_ids = []  # same placeholder ids, different image: nothing cached is valid

    def reseed(self) -> None:
        """Restart the random generator from ``sampling.seed`` (after changing the sampling settings)."""
        self._generator = make_generator(self.sampling.seed, next(self.model.parameters()).device)

    def clear_history(self) -> None:
        """Forget the conversation but keep the image (the cache goes with the history)."""
        self.history = []
        self._cached_ids = []

    def reset(self) -> None:
        """Forget the history, the image and the cache."""
        self.history = []
        self._image_embeds = None
        self._cached_ids = []
        self.model.delete_kv_cache()

    def prompt_ids(self, query: str) -> tuple[list[int], int | None]:
        """The prompt's ids and where the image placeholders start (None without an image)."""
        if not self.multimodal:
            return self.tokenizer.encode(chatglm_prompt(query, self.history)), None
        image_length = None if self._image_embeds is None else self.model.config.image_length
        english = self.english if self.english is not None else not has_cjk(query)
        return visualglm_ids(self.tokenizer, query, self.history, image_length=image_length, english=english)

    def stream(self, query: str) -> Iterator[str]:
        """Yield the answer as text deltas; the turn is added to ``history`` when the stream ends (also
        when the caller stops early, with the text shown so far)."""
        ids, image_start = self.prompt_ids(query)
        embeds = None
        if image_start is not None:
            with torch.inference_mode():
                device = self._image_embeds.device
                embeds = self.model.embed_with_images(torch.tensor([ids], device=device), self._image_embeds,
                                                      [image_start])
        reuse = self.model.reusable_prefix(self._cached_ids, ids) if self._cached_ids else 0
        params = GenerationParams(max_new_tokens=self.max_new_tokens, max_length=self.max_length,
                                  stop_ids=(self.model.config.eos_token_id,), sampling=self.sampling)
        decoded = DecodeStream(self.tokenizer, postprocess="chatglm")
        chosen: list[int] = []
        self._cached_ids = []  # invalid while the cache is being rewritten
        self.last_prefill_tokens = len(ids) - reuse
        try:
            for step in generate_steps(self.model, [ids], params=params, generator=self._generator,
                                       reuse_prefix=reuse, keep_cache=True, compiled=self._compiled,
                                       inputs_embeds=embeds):
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


def has_cjk(text: str) -> bool:
    """True when ``text`` holds a CJK unified ideograph (U+4E00..U+9FFF), the reference demos' test."""
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


@torch.inference_mode()
def regenerate(session: ChatSession) -> str:
    """Answer the last query again (a new sample), reusing the cached prompt."""
    if not session.history:
        raise ValueError("nothing to regenerate: the history is empty")
    query, _ = session.history.pop()
    return session.chat(query)
