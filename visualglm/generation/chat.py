"""Chat sessions: history, the reference prompt templates, images, streaming text, and KV-cache reuse.

A session generates on a one-row :class:`~visualglm.generation.continuous.ContinuousEngine` of its own (the
engine the server runs), which keeps the tokens of the last turn in its slot. A new turn prefills only what
the model says is still exact (``model.reusable_prefix``). For ChatGLM-6B's template this is the whole
prompt when it did not change (e.g. regenerating an answer) and nothing when the history grew: every turn
puts the history into the bidirectional prefix, whose keys/values depend on all of it, so reusing them would
change the answers (tests/generation/test_chat.py shows the difference).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from visualglm.config import image_size
from visualglm.families import FAMILIES, FamilySpec, family_spec
from visualglm.generation.continuous import ContinuousEngine, EngineRequest
from visualglm.generation.detok import DecodeStream
from visualglm.generation.engine import GenerationParams, compile_decode
from visualglm.generation.sampling import SamplingParams, make_generator
from visualglm.image import load_image, preprocess
from visualglm.models.interface import is_multimodal
from visualglm.tokenizers.templates import glm4_messages, has_cjk  # noqa: F401 (has_cjk: re-exported)


class FamilyDefault(enum.Enum):
    """The type of :data:`FAMILY_DEFAULT`. An enum of one member: it pickles to the same object (batch
    settings travel to Ray replicas) and a type checker tells it from an int."""

    FAMILY_DEFAULT = "the family's reference max_length"

    def __repr__(self) -> str:
        return "FAMILY_DEFAULT"


# ``max_length=FAMILY_DEFAULT``: the family's reference chat max_length (FamilySpec.max_length: 2048, GLM-4V-9B
# 8192); ``max_length=None``: no limit besides the context.
FAMILY_DEFAULT = FamilyDefault.FAMILY_DEFAULT
MaxLength = int | FamilyDefault | None


def is_family_default(max_length: MaxLength) -> bool:
    """True for :data:`FAMILY_DEFAULT`."""
    return max_length is FAMILY_DEFAULT


def resolve_max_length(max_length: MaxLength, model_or_config) -> int | None:
    """``max_length`` with :data:`FAMILY_DEFAULT` replaced by the family's reference max_length (prompt +
    answer); an int or None (no limit) is returned as is."""
    return default_max_length(model_or_config) if is_family_default(max_length) else max_length


class ChatSession:
    """A conversation with ChatGLM-6B, VisualGLM-6B or GLM-4V-9B.

    ``history`` is a list of ``(query, response)`` pairs (GLM-4V's message dicts are built from it, see
    ``messages``). Defaults follow the reference chat functions: ``max_length`` (prompt + answer;
    :data:`FAMILY_DEFAULT` is the family's, None no limit) 2048, or 8192 for GLM-4V-9B; ChatGLM-6B samples with
    top_p 0.7 and temperature 0.95, VisualGLM-6B with its demo's top_p 0.4, top_k 100, temperature 0.8 and
    repetition penalty 1.2, GLM-4V-9B with top_p 0.8 and temperature 0.8, stopping on its three stop ids. GLM-4
    attention is causal, so there each turn reuses the cache of the earlier turns. A VisualGLM-6B or GLM-4V-9B
    session may hold one image (``set_image``), encoded once and reused by every turn. VisualGLM's template
    language: ``english=None`` picks ``Q:/A:`` for a query without CJK characters and ``问：/答：`` otherwise (as
    its web demo); ``english=True`` forces ``Q:/A:`` and bans the Chinese pieces (its ``--english``);
    ``english=False`` forces Chinese.
    """

    def __init__(self, model: nn.Module, tokenizer, *, sampling: SamplingParams | None = None,
                 max_length: MaxLength = FAMILY_DEFAULT, max_new_tokens: int | None = None,
                 history: list[tuple[str, str]] | None = None, compile: bool = False,
                 image=None, english: bool | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.spec = family_spec(model)
        self.family = self.spec.name
        self.multimodal = is_multimodal(model)
        if english is not None and not self.spec.template_language:
            raise ValueError(f"english mode is a {_owners(lambda spec: spec.template_language)} option")
        self.english = english
        if sampling is None:
            sampling = SamplingParams.for_family(self.spec)
            if english:
                sampling = sampling.replace(banned_ranges=self.spec.english_banned_ranges)
        # The output layer has more rows than the tokenizer has ids (padding): never sample an id that cannot
        # be decoded. The reference would give them ~0 probability anyway; here it is a guarantee.
        unknown = model_undecodable_ranges(model, tokenizer)
        if unknown:
            sampling = sampling.replace(banned_ranges=tuple(sampling.banned_ranges) + tuple(unknown))
        self.sampling = sampling.validate()
        self.max_length: int | None = resolve_max_length(max_length, self.spec)
        self.max_new_tokens = max_new_tokens
        self.history: list[tuple[str, str]] = [tuple(turn) for turn in (history or [])]
        self._generator = make_generator(self.sampling.seed, next(model.parameters()).device)
        self._engine: ContinuousEngine | None = None  # created at the first turn
        self._turns = 0
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
            raise ValueError(f"this model has no image encoder: images need a "
                             f"{_owners(lambda spec: spec.multimodal)} checkpoint")
        config = self.model.config
        size = image_size(config)
        device = next(self.model.parameters()).device
        pixels = preprocess(load_image(image, allow_remote=allow_remote), size).to(device)
        self._image_embeds = self.model.encode_images(pixels)
        self.encoded_images += 1  # also names the image: the same placeholder ids, a different image

    def reseed(self) -> None:
        """Restart the random generator from ``sampling.seed`` (after changing the sampling settings)."""
        self._generator = make_generator(self.sampling.seed, next(self.model.parameters()).device)

    def clear_history(self) -> None:
        """Forget the conversation but keep the image (the cache goes with the history)."""
        self.history = []

    def reset(self) -> None:
        """Forget the history, the image and the cache."""
        self.history = []
        self._image_embeds = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def messages(self, query: str) -> list[dict]:
        """The conversation in GLM-4's message format (the image, if any, in the first user message)."""
        return glm4_messages(query, self.history, image=self._image_embeds is not None)

    def prompt_ids(self, query: str) -> tuple[list[int], int | None]:
        """The prompt's ids and where the image placeholders start (None without an image)."""
        return build_prompt_ids(self.model, self.tokenizer, query, self.history,
                                image=self._image_embeds is not None, english=self.english)

    def stream(self, query: str) -> Iterator[str]:
        """Yield the answer as text deltas; the turn is added to ``history`` when the stream ends (also
        when the caller stops early, with the text shown so far)."""
        ids, image_start = self.prompt_ids(query)
        if self._engine is None:
            self._engine = ContinuousEngine(self.model, max_rows=1, compiled=self._compiled)
        engine = self._engine
        params = GenerationParams(max_new_tokens=self.max_new_tokens, max_length=self.max_length,
                                  stop_ids=answer_stop_ids(self.model.config), sampling=self.sampling)
        decoded = DecodeStream(self.tokenizer, postprocess=self.spec.postprocess)
        self._turns += 1
        key = self._turns
        image = self._image_embeds if image_start is not None else None
        engine.submit(EngineRequest(key, ids, params, image_start=image_start, image_embeds=image,
                                    image_key=None if image is None else f"image-{self.encoded_images}",
                                    generator=self._generator))
        computed = engine.stats.prefill_tokens
        finished = False
        try:
            while not finished:
                for event in engine.step():
                    if event.id != key:
                        continue
                    if event.reason == "error":
                        raise event.error
                    finished = event.reason is not None
                    if event.token is not None:
                        delta = decoded.push(event.token)
                        if delta:
                            yield delta
                self.last_prefill_tokens = engine.stats.prefill_tokens - computed
            tail = decoded.flush()
            if tail:
                yield tail
        finally:
            if not finished:  # the caller stopped reading: the row ends at the engine's next step
                engine.end(key)
            self.history.append((query, decoded.text))

    def chat(self, query: str) -> str:
        """The whole answer to ``query`` (and the turn appended to ``history``)."""
        return "".join(self.stream(query))


def _owners(has: Callable[[FamilySpec], bool]) -> str:
    """The display names of the families for which ``has`` holds ("VisualGLM-6B or GLM-4V-9B")."""
    return " or ".join(spec.display_name for spec in FAMILIES.values() if has(spec))


def build_prompt_ids(model: nn.Module, tokenizer, query: str, history: Sequence[tuple[str, str]], *,
                     image: bool, english: bool | None = None) -> tuple[list[int], int | None]:
    """The reference chat template's prompt ids for ``query`` after ``history``, and where the image
    placeholders start (None without an image); the family's ``FamilySpec.build_prompt``.

    Only ids are built: the placeholders' count comes from the config (VisualGLM ``image_length``, GLM-4V
    ``expand_image_placeholders``), so a server can check a prompt's length before encoding its image.
    ``english`` (VisualGLM only): None picks ``Q:/A:`` for a query without CJK characters.
    """
    return family_spec(model).build_prompt(model, tokenizer, query, history, image, english)


def default_sampling(model_or_config) -> SamplingParams:
    """The sampling of the family's reference chat function (``FamilySpec.sampling``)."""
    return SamplingParams.for_family(model_or_config)


def default_max_length(model_or_config) -> int:
    """The reference chat function's max_length (prompt + answer) for the family."""
    return family_spec(model_or_config).max_length


def answer_postprocess(model_or_config) -> str:
    """The detokenizer's answer post-processing for the family (see :class:`DecodeStream`)."""
    return family_spec(model_or_config).postprocess


def answer_stop_ids(config) -> tuple[int, ...]:
    """The ids that end an answer: GLM-4V-9B's three stop ids, or ChatGLM's end-of-text id."""
    return family_spec(config).stop_ids(config)


def model_undecodable_ranges(model: nn.Module, tokenizer) -> list[tuple[int, int]]:
    """Ranges of output rows the tokenizer has no id for (padding rows): never to be sampled."""
    return undecodable_ranges(tokenizer.known_ids(), model.get_input_embeddings().num_embeddings)


def undecodable_ranges(known_ids, vocab: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of ``[0, vocab)`` holding no id from ``known_ids`` (sorted)."""
    ranges, expected = [], 0
    for i in known_ids:
        if i >= vocab:
            break
        if i > expected:
            ranges.append((expected, i))
        expected = i + 1
    if expected < vocab:
        ranges.append((expected, vocab))
    return ranges


@torch.inference_mode()
def regenerate(session: ChatSession) -> str:
    """Answer the last query again (a new sample), reusing the cached prompt."""
    if not session.history:
        raise ValueError("nothing to regenerate: the history is empty")
    query, _ = session.history.pop()
    return session.chat(query)
