"""What a model family is, in one record: the classes, data and defaults every other layer asks for.

A :class:`FamilySpec` holds everything that differs between ChatGLM-6B, VisualGLM-6B and GLM-4V-9B outside
their model code: the config and model classes, the checkpoint key maps, the quantization and
tensor-parallel plans, the LoRA defaults and the vision tower, the reference chat function's sampling and
length defaults, the tokenizer, prompt building, the ids that end an answer and the answer's text
post-processing. The rest of the package never names a family: it looks the spec up
(:func:`visualglm.families.family_spec`) and reads it. docs/adding-a-family.md lists what a new family takes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from visualglm.models.plans import TensorParallelPlan

# Source checkpoint key -> our parameter name; ``{}`` stands for a layer index, None drops the key
# (see visualglm.checkpoint.keymaps for the machinery that applies a map).
KeyMap = dict[str, str | None]

# (model, tokenizer, query, history, image, english) -> (prompt ids, index of the first image slot or None).
PromptBuilder = Callable[[nn.Module, Any, str, Sequence[tuple[str, str]], bool, "bool | None"],
                         tuple[list[int], "int | None"]]


@dataclass(frozen=True)
class FamilySpec:
    """One model family. ``name`` equals the config class's ``family``."""

    name: str
    display_name: str  # in messages and summaries ("ChatGLM-6B")
    chat_label: str  # how `visualglm chat` labels the model's answers (the reference demos' speaker)
    config_class: type
    model_class: type[nn.Module]
    tokenizer_class: type
    keymaps: Mapping[str, KeyMap]  # by source format: "hf", and "sat" where SwissArmyTransformer has one
    # Quantization: fnmatch patterns of modules that stay in floating point, and the optional parts a user may
    # quantize as well (``quantize_also``), each with the patterns it removes from the skip list.
    quant_skip: tuple[str, ...]
    quant_optional: Mapping[str, tuple[str, ...]]
    vision_tower: str | None  # module name of the image encoder (None: text only); frozen, never a LoRA target
    tp_plan: TensorParallelPlan
    lora: Mapping[str, Any]  # LoraConfig fields of the reference fine-tuning recipe
    sampling: Mapping[str, Any]  # SamplingParams fields of the reference chat function
    max_length: int  # the reference chat function's max_length (prompt + answer)
    build_prompt: PromptBuilder  # the reference chat template (ids only: images are encoded separately)
    stop_ids: Callable[[Any], tuple[int, ...]]  # config -> the ids that end an answer
    postprocess: str  # the answer post-processing style: "strip" or "full-width" (detok.POSTPROCESS_STYLES)
    # Fine-tuning: True for a prefix LM that only predicts after its prompt (one example per answer, earlier
    # turns as history); False when one causal sequence holds the whole conversation.
    example_per_turn: bool
    # How the training data encodes an answer's text (``tokenizer.encode`` keyword arguments).
    answer_encoding: Mapping[str, Any] = field(default_factory=dict)
    template_language: bool = False  # the chat template has an English and a Chinese form (``english=``)
    sat_model_class: str | None = None  # SwissArmyTransformer's model_class, where sat has the family
    thudm_quantized: bool = False  # THUDM's own quantized checkpoints (quantization_bit) are read
    # --- the reference remote code's API, as visualglm.compat mirrors it ------------------------------------
    # Its chat()/stream_chat() signature, a key of visualglm.compat.chat.SIGNATURES: "text" (query, history of
    # (query, response) pairs), "image_first" (image_path, then as "text"), "messages" (query, history of
    # message dicts, role, image). None: the family has no reference chat().
    hf_chat: str | None = None
    # True for GLM-4's tokenizer kind: its own chat template over message dicts, [gMASK] <sop> as a prefix,
    # position_ids in its output, special tokens decoded unless skipped. False: ChatGLM-6B's SentencePiece kind
    # ([gMASK] <sop> appended, no template: the chat() prompt is built from ``hf_prompt_text``).
    hf_tokenizer_template: bool = False
    # (query, history pairs) -> the reference chat()'s prompt text, for a tokenizer without a template.
    hf_prompt_text: Callable[[str, Sequence[tuple[str, str]]], str] | None = None
    # (tokenizer, query, history pairs, image_length) -> (prompt ids with the image placeholders, where they
    # start): the reference build_inputs_with_image, for a family told where its image goes (pre_image_length).
    hf_image_prompt: Callable[[Any, str, Sequence[tuple[str, str]], int], tuple[list[int], int]] | None = None
    # (model, prompt ids) -> (the ids with the image placeholder widened to the image's vectors, where it starts
    # or None): for a family whose prompts mark the image with tokens the model finds (GLM-4V's <|begin_of_image|>).
    image_placeholders: Callable[[nn.Module, list[int]], tuple[list[int], int | None]] | None = None
    # [start, end) id ranges never sampled when the template's English form is forced (``english=True``, for a
    # family with ``template_language``): VisualGLM-6B's cli_demo --english bans the Chinese pieces.
    english_banned_ranges: tuple[tuple[int, int], ...] = ()

    @property
    def multimodal(self) -> bool:
        return self.vision_tower is not None

    def quant_skip_patterns(self, also: Sequence[str] = ()) -> tuple[str, ...]:
        """The skip patterns once the optional parts named in ``also`` are quantized too."""
        unknown = [part for part in also if part not in self.quant_optional]
        if unknown:
            offered = ", ".join(sorted(self.quant_optional)) or "none"
            raise ValueError(f"cannot also quantize {', '.join(map(repr, unknown))} in a {self.name} model "
                             f"(optional parts offered: {offered})")
        dropped = {pattern for part in also for pattern in self.quant_optional[part]}
        return tuple(pattern for pattern in self.quant_skip if pattern not in dropped)

    def keymap(self, fmt: str) -> KeyMap:
        """The key map of source format ``fmt``; ValueError naming the formats this family has."""
        try:
            return self.keymaps[fmt]
        except KeyError:
            raise ValueError(f"{self.display_name} has no {fmt!r} checkpoint layout "
                             f"(known: {', '.join(sorted(self.keymaps))})") from None
