"""``model.generate(**inputs, ...)`` with Hugging Face's argument meanings, run by the engine.

Semantics follow ``transformers``' ``GenerationMixin.generate`` for greedy and sampling search:

- ``max_new_tokens`` counts new tokens only; ``max_length`` counts ``input_ids.shape[-1]`` (left padding
  included, GLM-4V's three image placeholder ids counted as three) plus the new tokens; ``max_new_tokens``
  wins when both are given; the model's context bounds both.
- Defaults come from the checkpoint's ``generation_config.json`` when it has one (GLM-4V-9B: do_sample,
  top_p 0.8, temperature 0.8, max_length 8192), else from ``transformers``' ``GenerationConfig``
  (max_length 20, greedy, top_k 50, top_p 1.0, temperature 1.0) with the eos/pad ids of config.json.
- The result is ``[B, T + new]``: the input ids as given, then the new ids; a row that stopped early is
  filled with the pad id, and the call ends when every row has stopped.

Differences, on purpose: the random draws use a generator seeded from torch's global RNG (so
``torch.manual_seed`` makes a call reproducible, though not draw-for-draw equal to ``transformers``); ids
the tokenizer cannot decode (padding rows of the output layer) are never chosen; left padding is not
penalised by ``repetition_penalty``. Arguments that would select anything else (beam search, several
sequences per prompt, custom logits processors, ...) are refused with an error naming them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visualglm.compat.tokenizer import no_images_message, refuse_extra
from visualglm.families import family_spec
from visualglm.generation.engine import GenerationParams, generate_steps, left_pad
from visualglm.generation.sampling import HF_DEFAULT_TOP_K, SamplingParams, make_generator

# transformers' GenerationConfig defaults for the fields we apply.
HF_DEFAULTS: dict[str, Any] = {"max_length": 20, "max_new_tokens": None, "do_sample": False, "temperature": 1.0,
                               "top_k": HF_DEFAULT_TOP_K, "top_p": 1.0, "repetition_penalty": 1.0}

# Arguments accepted at the value that leaves greedy/sampling search unchanged, refused at any other.
NEUTRAL: dict[str, Any] = {
    "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "penalty_alpha": None, "min_length": 0,
    "min_new_tokens": None, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
    "force_words_ids": None, "constraints": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "min_p": None, "diversity_penalty": 0.0, "logits_processor": None, "stopping_criteria": None,
    "prefix_allowed_tokens_fn": None, "output_scores": False, "output_logits": False, "output_attentions": False,
    "output_hidden_states": False, "return_dict_in_generate": False, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "exponential_decay_length_penalty": None, "guidance_scale": None, "assistant_model": None,
    "generation_config": None, "negative_prompt_ids": None, "inputs_embeds": None, "past_key_values": None,
    "stop_strings": None, "renormalize_logits": False, "remove_invalid_values": False, "max_time": None,
}
# Accepted with any value because they cannot change greedy/sampling results (beam-only, or bookkeeping).
HARMLESS = ("use_cache", "length_penalty", "early_stopping", "bos_token_id", "synced_gpus", "decoder_start_token_id")


def generation_defaults(model: nn.Module) -> dict[str, Any]:
    """``HF_DEFAULTS`` + the eos/pad ids of config.json, overridden by ``generation_config.json``."""
    config = model.config
    eos = config.eos_token_id
    defaults = {**HF_DEFAULTS, "eos_token_id": eos, "pad_token_id": config.pad_token_id}
    directory = getattr(model, "checkpoint_dir", None)
    path = Path(directory) / "generation_config.json" if directory is not None else None
    if path is not None and path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(stored, dict):
            raise ValueError(f"{path} must hold a JSON object")
        defaults.update({k: v for k, v in stored.items() if k in defaults})
    return defaults


def _check_neutral(kwargs: dict[str, Any]) -> None:
    for name in HARMLESS:
        kwargs.pop(name, None)
    changed = []
    for name in [n for n in kwargs if n in NEUTRAL]:
        value, neutral = kwargs.pop(name), NEUTRAL[name]
        if value is not None and value != neutral and not (isinstance(value, Sequence) and len(value) == 0):
            changed.append(f"{name}={value!r}")
    if changed:
        beam = " (beam search is not supported)" if any(c.startswith("num_beams") for c in changed) else ""
        raise ValueError(f"generate() supports greedy and sampling search only{beam}; unsupported: "
                         f"{', '.join(changed)}")
    refuse_extra(kwargs, "generate()")


def _as_ids(input_ids: Any) -> torch.Tensor:
    if input_ids is None:
        raise ValueError("generate() needs input_ids (e.g. model.generate(**tokenizer(text, return_tensors='pt')))")
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0 or ids.is_floating_point():
        raise ValueError(f"input_ids must be integer ids [batch, length], got shape {tuple(ids.shape)}")
    return ids.long()


def _pad_counts(ids: torch.Tensor, attention_mask: Any, pad_id: int | None, eos: tuple[int, ...]) -> list[int]:
    """Left padding of each row, from the mask, or (no mask) where pad ids lead a row as transformers infers
    it (only when the pad id is not an eos id: GLM-4's pad id is its image placeholder)."""
    if attention_mask is None:
        if pad_id is None or pad_id in eos:
            return [0] * ids.shape[0]
        mask = ids.ne(pad_id)
    else:
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) else torch.tensor(attention_mask)
        if mask.dim() == 1:
            mask = mask[None]
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask must be the [batch, length] padding mask of input_ids "
                             f"{tuple(ids.shape)}, got shape {tuple(mask.shape)}")
        mask = mask.bool()
    counts = []
    for row, keep in enumerate(mask.cpu()):
        real = keep.nonzero()
        if real.numel() == 0:
            raise ValueError(f"row {row} of input_ids is all padding")
        first = int(real[0])
        if not bool(keep[first:].all()):
            raise ValueError(f"row {row} has padding after its first token: only left padding is supported "
                             "(the tokenizer pads on the left)")
        counts.append(first)
    return counts


def _check_positions(model: nn.Module, position_ids: Any, ids: torch.Tensor, num_pad: list[int]) -> None:
    """Positions are computed from the ids; given ones must be the reference tokenizer's, or they would
    change the results."""
    if position_ids is None:
        return
    given = position_ids if isinstance(position_ids, torch.Tensor) else torch.tensor(position_ids)
    given = given.cpu().long()
    if family_spec(model).hf_tokenizer_template:  # the reference tokenizer's own: 0 on padding, then 0, 1, ...
        expected = torch.tensor([[0] * n + list(range(ids.shape[1] - n)) for n in num_pad])
    else:
        expected = model.prompt_inputs(ids.cpu(), num_pad)[0].long()
    if given.shape != expected.shape or not torch.equal(given, expected):
        raise ValueError("custom position_ids are not supported: leave them out or pass the tokenizer's")


def _image_rows(model: nn.Module, rows: list[list[int]], images: Any, pre_image_length: Any
                ) -> tuple[list[list[int]], list[int | None]]:
    """Prompt rows as the model reads them (GLM-4V's placeholders widened) and where each row's image
    starts (None: no image)."""
    spec = family_spec(model)
    if spec.image_placeholders is not None:
        if pre_image_length is not None:
            raise ValueError(f"pre_image_length does not apply to {spec.display_name}: the image placeholder in "
                             "the ids marks where its image goes")
        expanded = [spec.image_placeholders(model, row) for row in rows]
        rows, starts = [r for r, _ in expanded], [s for _, s in expanded]
        wanted = sum(s is not None for s in starts)
        if images is None and wanted:
            raise ValueError(f"{wanted} prompt(s) hold an image placeholder but no images were passed")
        return rows, starts
    if images is None:
        if pre_image_length is not None:
            raise ValueError("pre_image_length was given without images")
        return rows, [None] * len(rows)
    if spec.hf_image_prompt is None:
        raise ValueError(no_images_message(spec))
    if pre_image_length is None:
        raise ValueError(f"{spec.display_name} images need pre_image_length (model.build_inputs_with_image "
                         "returns it)")
    starts = [pre_image_length] * len(rows) if isinstance(pre_image_length, int) else list(pre_image_length)
    if len(starts) != len(rows) or not all(isinstance(s, int) for s in starts):
        raise ValueError(f"pre_image_length must be an int or one int per row ({len(rows)} rows)")
    length = model.config.image_length
    for row, (ids, start) in enumerate(zip(rows, starts, strict=True)):
        if not 0 <= start <= len(ids) - length:
            raise ValueError(f"row {row}: {length} image placeholders from pre_image_length={start} do not fit "
                             f"its {len(ids)} tokens")
    return rows, starts


@torch.inference_mode()
def _prompt_embeds(model: nn.Module, rows: list[list[int]], starts: list[int | None], images: Any,
                   pad_id: int, device: torch.device) -> torch.Tensor | None:
    """Embeddings of the left-padded rows with each image's vectors at its row's start (None: no image)."""
    with_image = [b for b, s in enumerate(starts) if s is not None]
    if not with_image:
        if images is not None:
            raise ValueError("images were passed but no prompt holds an image placeholder")
        return None
    pixels = images if isinstance(images, torch.Tensor) else torch.as_tensor(images)
    if pixels.dim() == 3:
        pixels = pixels[None]
    if pixels.dim() != 4 or pixels.shape[0] != len(with_image):
        raise ValueError(f"images must be [{len(with_image)}, 3, H, W] (one per prompt with an image placeholder), "
                         f"got shape {tuple(pixels.shape)}")
    encoded = model.encode_images(pixels.to(device))
    image_embeds = encoded.new_zeros(len(rows), *encoded.shape[1:])
    image_embeds[with_image] = encoded
    padded, num_pad = left_pad(rows, pad_id)
    shifted = [None if s is None else s + n for s, n in zip(starts, num_pad, strict=True)]
    return model.embed_with_images(padded.to(device), image_embeds, shifted)


def _budget(length: int, max_length: int | None, max_new_tokens: int | None, defaults: dict[str, Any]) -> int:
    """New tokens allowed after a ``length``-token input, with transformers' precedence."""
    if max_new_tokens is None and max_length is None:
        max_new_tokens, max_length = defaults["max_new_tokens"], defaults["max_length"]
    if max_new_tokens is not None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        return max_new_tokens
    if not isinstance(max_length, int) or max_length <= length:
        raise ValueError(f"max_length={max_length!r} leaves no room for new tokens after the {length}-token input "
                         "(max_length counts the input): raise it or pass max_new_tokens")
    return max_length - length


def _stop_ids(eos: Any) -> tuple[int, ...]:
    if eos is None:
        return ()
    return (int(eos),) if isinstance(eos, int) else tuple(int(i) for i in eos)


def global_seed() -> int:
    """A seed drawn from torch's global RNG: ``torch.manual_seed`` then makes sampling reproducible."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def generate(model: nn.Module, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
             images: Any = None, pre_image_length: Any = None, *, banned_ranges: Sequence[tuple[int, int]] = (),
             max_length: int | None = None, max_new_tokens: int | None = None, do_sample: bool | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float | None = None, eos_token_id: Any = None, pad_token_id: int | None = None,
             streamer: Any = None, **kwargs: Any) -> torch.Tensor:
    """Prompt + new ids ``[B, T + new]`` on the model's device (see the module docstring).

    ``images``: GLM-4V-9B pixels for each prompt holding ``<|begin_of_image|>`` (in row order), or VisualGLM-6B
    pixels for every row with ``pre_image_length`` (an int, or one per row: tokens before the placeholders).
    ``banned_ranges`` are ``[start, end)`` ids never chosen. ``streamer`` (an object with ``put``/``end``, as
    ``transformers``' streamers) gets the input ids, then each step's new ids ``[B]``, then ``end()``.
    """
    _check_neutral(dict(kwargs))
    defaults = generation_defaults(model)
    ids = _as_ids(input_ids)
    eos = _stop_ids(defaults["eos_token_id"] if eos_token_id is None else eos_token_id)
    pad_id = defaults["pad_token_id"] if pad_token_id is None else pad_token_id
    if pad_id is None:
        pad_id = eos[0] if eos else 0

    def pick(value: Any, name: str) -> Any:
        return defaults[name] if value is None else value

    sample = pick(do_sample, "do_sample")
    sampling = SamplingParams(do_sample=sample, temperature=pick(temperature, "temperature"),
                              top_k=pick(top_k, "top_k"), top_p=pick(top_p, "top_p"),
                              repetition_penalty=pick(repetition_penalty, "repetition_penalty"),
                              seed=global_seed() if sample is True else None, banned_ranges=tuple(banned_ranges))
    params = GenerationParams(max_new_tokens=_budget(ids.shape[1], max_length, max_new_tokens, defaults),
                              stop_ids=eos, sampling=sampling.validate())
    num_pad = _pad_counts(ids, attention_mask, pad_id, eos)
    _check_positions(model, position_ids, ids, num_pad)
    rows = [row[n:] for row, n in zip(ids.tolist(), num_pad, strict=True)]
    rows, starts = _image_rows(model, rows, images, pre_image_length)
    device = next(model.parameters()).device
    embeds = _prompt_embeds(model, rows, starts, images, pad_id, device)
    if streamer is not None:
        streamer.put(ids.cpu())
    new = []
    for step in generate_steps(model, rows, pad_id=pad_id, params=params, inputs_embeds=embeds,
                               generator=make_generator(sampling.seed, device)):
        new.append(step.tokens)
        if streamer is not None:
            streamer.put(step.tokens.cpu())
    if streamer is not None:
        streamer.end()
    return torch.cat([ids.to(device), torch.stack(new, dim=1).to(device)], dim=1)
