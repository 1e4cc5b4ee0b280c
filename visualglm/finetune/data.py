"""Fine-tuning data: two file formats, validation before training, tokenisation with label masking.

Formats (picked by content: a JSON list, else JSON lines):
- the VisualGLM-6B reference format, a JSON list of ``{"img": path?, "prompt": str, "label": str}``;
  ``img`` is optional and relative to the data file's folder;
- chat JSONL (GLM-4 finetune style), one ``{"messages": [{"role": "user"|"assistant", "content": str,
  "image"?: path}, ...]}`` per line; an image only in the first user message; the last message is the
  assistant's.

Every row is checked (types, roles, image files readable, prompt length) before any training starts; a
problem raises ``DataError`` naming the file, the row and what is wrong.

Prompts use the inference templates, so a fine-tuned model is asked exactly as it was trained:
ChatGLM-6B ``chatglm_prompt`` (+ ``[gMASK] <sop>``), VisualGLM-6B ``visualglm_ids`` (``Q:/A:`` for a query
without CJK characters, ``问：/答：`` otherwise, as the chat does by default), GLM-4V the chat template.
Labels are -100 except on answer tokens, and the stop token after each answer IS a label (``<eop>`` for
ChatGLM/VisualGLM, ``<|user|>`` for GLM-4V; the GLM-4 reference script leaves it out, so its models never
learn to stop). Labels are aligned with ``input_ids``: the loss compares logits at t with labels at t + 1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from visualglm.families import family_spec
from visualglm.generation.chat import has_cjk
from visualglm.image import ImageError, load_image, preprocess
from visualglm.tokenizers.templates import chatglm_prompt, visualglm_ids

IGNORE_INDEX = -100


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file, the row and the problem."""


@dataclass
class Conversation:
    """One validated row: alternating (user, assistant) turns and an optional image (first user turn)."""

    turns: list[tuple[str, str]]
    image: Path | None
    where: str  # "file: row N" for messages


@dataclass
class Example:
    """A tokenised training example. ``input_ids``/``labels`` ``[T]``; ``image_start`` = first image slot."""

    input_ids: list[int]
    labels: list[int]
    image: Path | None
    image_start: int | None
    where: str


# ----------------------------------------------------------------------------------------- reading files
def read_conversations(path: str | Path) -> list[Conversation]:
    """Parse and validate a data file (either format); images are opened to check they are readable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        items = [(f"{path}: row {i + 1}", row) for i, row in enumerate(rows)]
        parse = _reference_row
    else:
        items = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                items.append((where, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
        parse = _chat_row
    if not items:
        raise DataError(f"{path}: no examples")
    return [parse(row, where, path.parent) for where, row in items]


def _text(row: dict, key: str, where: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise DataError(f"{where}: '{key}' must be a non-empty string, got {value!r:.60}")
    return value


def _image(value: Any, where: str, base: Path) -> Path | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: image must be a file path string, got {type(value).__name__}")
    path = Path(value) if Path(value).is_absolute() else base / value
    if not path.is_file():
        raise DataError(f"{where}: image file {path} does not exist")
    try:
        load_image(path)
    except ImageError as exc:
        raise DataError(f"{where}: image {path}: {exc}") from None
    return path


def _reference_row(row: Any, where: str, base: Path) -> Conversation:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with 'prompt' and 'label', got {type(row).__name__}")
    unknown = set(row) - {"img", "prompt", "label"}
    if unknown:
        raise DataError(f"{where}: unknown field(s) {sorted(unknown)} (expected img, prompt, label)")
    return Conversation([(_text(row, "prompt", where), _text(row, "label", where))],
                        _image(row.get("img"), where, base), where)


def _chat_row(row: Any, where: str, base: Path) -> Conversation:
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected {{\"messages\": [...]}} with at least one user and one assistant message")
    turns: list[tuple[str, str]] = []
    image = None
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {k + 1} is not an object")
        role = message.get("role")
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(f"{where}: message {k + 1} has role {role!r}; messages must alternate user, assistant "
                            "(system and tool messages are not supported)")
        content = _text(message, "content", f"{where}: message {k + 1}")
        if message.get("image") not in (None, ""):
            if k != 0:
                raise DataError(f"{where}: message {k + 1}: an image is only allowed in the first user message")
            image = _image(message["image"], where, base)
        if role == "user":
            turns.append((content, ""))
        else:
            turns[-1] = (turns[-1][0], content)
    if len(messages) % 2:
        raise DataError(f"{where}: the last message must be the assistant's (the answer to learn)")
    return Conversation(turns, image, where)


# -------------------------------------------------------------------------------------------- tokenising
class Tokenized:
    """Turns conversations into ``Example``s for one model family (ChatGLM-6B, VisualGLM-6B, GLM-4V-9B).

    ``max_source_length``: prompt tokens at most (a longer prompt is a validation error: cutting it could cut
    the image placeholders, the reference's bug); ``max_target_length``: answer tokens at most, stop token
    included (longer answers are cut, the stop token kept, as the reference does). ``english``: VisualGLM's
    template language (None = per query, like the chat).
    """

    def __init__(self, tokenizer, config, *, max_source_length: int = 512, max_target_length: int = 512,
                 english: bool | None = None) -> None:
        self.tokenizer, self.config = tokenizer, config
        self.spec = family_spec(config)
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.english = english
        self.truncated = 0

    def examples(self, conversations: Sequence[Conversation]) -> list[Example]:
        out = []
        for conv in conversations:
            if conv.image is not None and not self.spec.multimodal:
                raise DataError(f"{conv.where}: has an image, but {self.spec.display_name} is a text-only model")
            if self.spec.example_per_turn:
                # ChatGLM's prefix LM only predicts after <sop>: one example per answer, earlier turns as history.
                out += [self._turn_example(conv, i) for i in range(len(conv.turns))]
            else:
                out.append(self._conversation_example(conv))
        return out

    def _answer_ids(self, answer: str, stop: int, where: str) -> list[int]:
        ids = self.tokenizer.encode(answer, **self.spec.answer_encoding)
        if len(ids) + 1 > self.max_target_length:
            ids = ids[: self.max_target_length - 1]
            self.truncated += 1
        return ids + [stop]

    def _check_source(self, ids: list[int], where: str) -> None:
        if len(ids) > self.max_source_length:
            raise DataError(f"{where}: the prompt is {len(ids)} tokens, more than max_source_length="
                            f"{self.max_source_length} (shorten it or raise the limit)")

    def _turn_example(self, conv: Conversation, turn: int) -> Example:
        """Turn ``turn``'s answer as the labels after its prompt (earlier turns as history): a prefix LM's example."""
        history, (query, answer) = conv.turns[:turn], conv.turns[turn]
        where = conv.where if len(conv.turns) == 1 else f"{conv.where} (turn {turn + 1})"
        image = conv.image
        if self.spec.template_language:  # VisualGLM-6B's template (Q:/A: or 问：/答：, image placeholders)
            english = self.english if self.english is not None else not has_cjk(query)
            length = self.config.image_length if image is not None else None
            prompt, start = visualglm_ids(self.tokenizer, query, history, image_length=length, english=english)
        else:
            prompt, start = self.tokenizer.encode(chatglm_prompt(query, history)), None
        self._check_source(prompt, where)
        answer_ids = self._answer_ids(answer, self.config.eos_token_id, where)
        return Example(prompt + answer_ids, [IGNORE_INDEX] * len(prompt) + answer_ids, image, start, where)

    def _conversation_example(self, conv: Conversation) -> Example:
        """The whole conversation as one causal sequence, every answer (and its stop token) a label."""
        tok = self.tokenizer
        ids, labels = tok.get_prefix_tokens(), [IGNORE_INDEX, IGNORE_INDEX]
        prompt_length = 0
        for k, (query, answer) in enumerate(conv.turns):
            user = tok.build_single_message("user", "", query, image=(k == 0 and conv.image is not None))
            ids += user
            labels += [IGNORE_INDEX] * len(user)
            prompt_length = len(ids) + 1  # + <|assistant|>
            # The assistant message (role token, "\n", answer) and the stop token that follows it are labels.
            reply = [tok.assistant_token_id] + tok.encode("\n") + self._answer_ids(answer, tok.user_token_id,
                                                                                   conv.where)
            ids += reply
            labels += reply
        self._check_source(ids[:prompt_length], conv.where)
        start = None
        if conv.image is not None:
            boi = ids.index(self.config.boi_token_id)
            width = self.config.vision_config.num_image_tokens
            # The 3 placeholders become boi + N image vectors + eoi, as the model expands them.
            ids = ids[: boi + 1] + [ids[boi + 1]] * width + ids[boi + 2:]
            labels = labels[: boi + 1] + [IGNORE_INDEX] * width + labels[boi + 2:]
            start = boi
        return Example(ids, labels, conv.image, start, conv.where)


@dataclass
class Batch:
    """``input_ids``/``labels`` ``[B, T]`` (right-padded); ``pixel_values`` ``[n, 3, H, W]`` for the rows in
    ``image_rows`` (None without images); ``image_starts`` per row; ``images`` the image paths (cache keys)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    image_rows: list[int]
    image_starts: list[int | None]
    images: list[Path | None]

    @property
    def label_tokens(self) -> int:
        """Tokens that count in the loss (labels shifted by one)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def collate(examples: Sequence[Example], pad_id: int, size: tuple[int, int] | None,
            load_pixels: bool = True) -> Batch:
    """Right-pad a batch (pads are -100 labels after every real token, so no real token attends to them:
    ChatGLM's answer part and GLM-4 are causal). ``load_pixels=False`` skips reading images (cached)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    rows, pixels = [], []
    for row, example in enumerate(examples):
        ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
        if example.image is not None:
            rows.append(row)
            if load_pixels:
                pixels.append(preprocess(load_image(example.image), size))
    return Batch(ids, labels, torch.cat(pixels) if pixels else None, rows,
                 [e.image_start for e in examples], [e.image for e in examples])


def count_label_tokens(examples: Sequence[Example]) -> int:
    return sum(sum(1 for y in e.labels[1:] if y != IGNORE_INDEX) for e in examples)


def load_examples(path: str | Path, tokenizer, config, **options) -> tuple[list[Example], int]:
    """Read, validate and tokenise a data file; returns the examples and how many answers were cut."""
    tokenized = Tokenized(tokenizer, config, **options)
    examples = tokenized.examples(read_conversations(path))
    return examples, tokenized.truncated
