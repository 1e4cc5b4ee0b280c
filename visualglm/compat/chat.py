"""The reference models' ``chat`` / ``stream_chat``, each family with its own signature and defaults,
run by :class:`~visualglm.generation.chat.ChatSession`. The family's ``FamilySpec.hf_chat`` names its
signature (a key of :data:`SIGNATURES`).

- ChatGLM-6B: ``(tokenizer, query, history=None, max_length=2048, num_beams=1, do_sample=True, top_p=0.7,
  temperature=0.95, logits_processor=None, **kwargs)``; history is a list of ``(query, response)`` pairs.
- VisualGLM-6B: ``(tokenizer, image_path, query, history=None, max_length=1024, min_length=100,
  do_sample=True, top_p=0.4, top_k=100, temperature=0.8, repetition_penalty=1.2, ...)``; ``min_length``
  is accepted but not applied; the HF code's Chinese template is always used.
- GLM-4V-9B: ``(tokenizer, query, history=None, role="user", image=None, max_length=8192, num_beams=1,
  do_sample=True, top_p=0.8, temperature=0.8, ...)``; history is a list of message dicts. The caller's list
  is not mutated (the reference appends to it) and ``stream_chat`` answers the query (reference-spec D20).
  ``max_length`` counts the prompt with the image as its three placeholder ids, as the reference's
  ``generate`` sees it (not the 1602 vectors they become).

``**kwargs`` may hold ``max_new_tokens``, ``top_k`` and ``repetition_penalty``; anything else is refused.
Sampling draws from a generator seeded from torch's global RNG, so ``torch.manual_seed`` makes a call
reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from visualglm.compat.generate import global_seed
from visualglm.compat.tokenizer import refuse_extra, unwrap
from visualglm.families import family_spec
from visualglm.generation.chat import ChatSession
from visualglm.generation.sampling import SamplingParams

_EXTRA = ("max_new_tokens", "top_k", "repetition_penalty")


def _options(kwargs: dict[str, Any], num_beams: int, logits_processor: Any, where: str) -> dict[str, Any]:
    """Validate the reference's pass-through arguments; returns the ones we apply."""
    if num_beams != 1:
        raise ValueError("beam search is not supported (num_beams must be 1)")
    if logits_processor:
        raise ValueError("custom logits_processor lists are not supported")
    refuse_extra({k: v for k, v in kwargs.items() if k not in _EXTRA}, where)
    return {k: v for k, v in kwargs.items() if v is not None}


def _session(model: nn.Module, tokenizer: Any, history: list, max_length: int | None, sampling: SamplingParams,
             extra: dict[str, Any], image: Any = None, english: bool | None = None) -> ChatSession:
    sampling = sampling.replace(seed=global_seed() if sampling.do_sample else None,
                                **{k: extra[k] for k in ("top_k", "repetition_penalty") if k in extra})
    return ChatSession(model, unwrap(tokenizer), sampling=sampling, max_length=max_length,
                       max_new_tokens=extra.get("max_new_tokens"), history=history, image=image, english=english)


def _pairs(history: list | None) -> list[tuple[str, str]]:
    return [tuple(turn) for turn in (history or [])]


def _streamed(session: ChatSession, query: str, with_answer: Callable[[str], list]) -> Iterator[tuple[str, list]]:
    """``(response so far, with_answer(response))`` per text delta, and once for an empty answer."""
    response, yielded = "", False
    for delta in session.stream(query):
        response += delta
        yielded = True
        yield response, with_answer(response)
    if not yielded:
        yield response, with_answer(response)


def _pair_history(session: ChatSession, query: str) -> Callable[[str], list[tuple[str, str]]]:
    earlier = list(session.history)
    return lambda response: earlier + [(query, response)]


def chatglm_stream(model: nn.Module, tokenizer: Any, query: str, history: list | None = None,
                   max_length: int = 2048, num_beams: int = 1, do_sample: bool = True, top_p: float = 0.7,
                   temperature: float = 0.95, logits_processor: Any = None, **kwargs: Any
                   ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """ChatGLM-6B: yields ``(response so far, history with it)``."""
    extra = _options(kwargs, num_beams, logits_processor, "chat()")
    sampling = SamplingParams.for_family(model, top_p=top_p, temperature=temperature, do_sample=do_sample)
    session = _session(model, tokenizer, _pairs(history), max_length, sampling, extra)
    yield from _streamed(session, query, _pair_history(session, query))


def visualglm_stream(model: nn.Module, tokenizer: Any, image_path: Any, query: str, history: list | None = None,
                     max_length: int = 1024, min_length: int = 100, do_sample: bool = True, top_p: float = 0.4,
                     top_k: int = 100, temperature: float = 0.8, repetition_penalty: float = 1.2,
                     logits_processor: Any = None, num_beams: int = 1, **kwargs: Any
                     ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """VisualGLM-6B: the image path (or any image source; None or "" for none) comes first, as in its
    ``chat``. Yields ``(response so far, history with it)``."""
    extra = _options(kwargs, num_beams, logits_processor, "chat()")
    sampling = SamplingParams.for_family(model, top_p=top_p, top_k=top_k, temperature=temperature,
                                         repetition_penalty=repetition_penalty, do_sample=do_sample)
    session = _session(model, tokenizer, _pairs(history), max_length, sampling, extra, image=image_path or None,
                       english=False)  # the HF code has the Chinese template only
    yield from _streamed(session, query, _pair_history(session, query))


def glm4v_stream(model: nn.Module, tokenizer: Any, query: str, history: list | None = None, role: str = "user",
                 image: Any = None, max_length: int = 8192, num_beams: int = 1, do_sample: bool = True,
                 top_p: float = 0.8, temperature: float = 0.8, logits_processor: Any = None,
                 past_key_values: Any = None, return_past_key_values: bool = False, **kwargs: Any
                 ) -> Iterator[tuple[str, list[dict]]]:
    """GLM-4V-9B: history is the reference's list of message dicts. Yields ``(response so far, new
    history)``; the caller's list is left as it was."""
    extra = _options(kwargs, num_beams, logits_processor, "chat()")
    if past_key_values is not None or return_past_key_values:
        raise ValueError("past_key_values are not supported: pass the history (the KV cache of earlier turns is "
                         "reused by ChatSession)")
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
    sampling = SamplingParams.for_family(model, top_p=top_p, temperature=temperature, do_sample=do_sample)
    session = _session(model, tokenizer, pairs, None, sampling, extra, image=image)
    # The reference's max_length counts the prompt as generate() sees it, with the image's three placeholder
    # ids (the model widens them to the image's vectors inside its forward): a token budget, here.
    ids, start = session.prompt_ids(query)
    shown = len(ids) - (0 if start is None else model.image_tokens - 3)
    if max_length is not None:
        if max_length <= shown:
            raise ValueError(f"max_length {max_length} leaves no room to answer a prompt of {shown} tokens: raise "
                             "max_length or shorten the history")
        limits = [max_length - shown] + ([session.max_new_tokens] if session.max_new_tokens else [])
        session.max_new_tokens = min(limits)
    user = {"role": "user", "content": query}
    if image is not None and not any(m.get("image") is not None for m in history):
        user["image"] = image
    yield from _streamed(session, query,
                         lambda response: history + [user, {"role": "assistant", "metadata": "", "content": response}])


# The reference chat() signatures by ``FamilySpec.hf_chat``.
SIGNATURES: dict[str, Callable[..., Iterator[tuple[str, list]]]] = {
    "text": chatglm_stream, "image_first": visualglm_stream, "messages": glm4v_stream}


def stream_function(model: nn.Module) -> Callable[..., Iterator[tuple[str, list]]]:
    """The ``stream_chat`` of the model's family: the reference signature its spec names."""
    spec = family_spec(model)
    if spec.hf_chat is None:
        raise ValueError(f"{spec.display_name} has no reference chat()/stream_chat()")
    return SIGNATURES[spec.hf_chat]


def stream_chat(model: nn.Module, tokenizer: Any, *args: Any, **kwargs: Any) -> Iterator[tuple[str, list]]:
    """``(response so far, history)`` per text delta, for the model's family (see the module docstring)."""
    return stream_function(model)(model, tokenizer, *args, **kwargs)


def chat(model: nn.Module, tokenizer: Any, *args: Any, **kwargs: Any) -> tuple[str, list]:
    """The whole answer and the new history, for the model's family (see the module docstring)."""
    for last in stream_chat(model, tokenizer, *args, **kwargs):  # noqa: B007 (the last one)
        pass
    return last
