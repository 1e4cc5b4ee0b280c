"""A ``transformers``-style front for our tokenizers: ``tokenizer(text, return_tensors="pt")``,
``apply_chat_template(...)``, ``encode``, ``decode`` and ``batch_decode``, padding on the left.

The wrapped tokenizer (``.tokenizer``) is what ``ChatSession`` and the engine take; attributes not defined
here (special ids, ``convert_ids_to_tokens``, ...) are read from it. Returned fields: ``input_ids`` and
``attention_mask`` (``[B, T]``, 0 on the left padding), GLM-4's ``position_ids`` (``[B, T]``, 0 on
padding, as its reference tokenizer), and for a conversation with an image ``images`` (``[N, 3, S, S]``
float32) plus, for VisualGLM-6B, ``pre_image_length`` (tokens before the image placeholders).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from visualglm.compat.encoding import BatchEncoding
from visualglm.families import FAMILIES, FamilySpec, family_spec
from visualglm.image import preprocess

_PADDING = (False, None, True, "longest", "max_length", "do_not_pad")


def refuse_extra(kwargs: Mapping[str, Any], where: str) -> None:
    """TypeError naming every argument ``where`` does not take (silently dropping one could change results)."""
    if kwargs:
        raise TypeError(f"{where} got arguments visualglm does not support: {', '.join(sorted(kwargs))}")


def id_list(token_ids: Any) -> list[int]:
    """One id sequence (tensor, array or list; a single id is a sequence of one) as a list of ints."""
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    if isinstance(token_ids, int):
        return [token_ids]
    ids = list(token_ids)
    if any(isinstance(i, (list, tuple)) for i in ids):
        raise ValueError("decode takes one sequence of ids; use batch_decode for a batch")
    return [int(i) for i in ids]


class CompatTokenizer:
    """ChatGLM-6B / VisualGLM-6B (SentencePiece) or GLM-4V-9B (tiktoken) tokenizer with the HF call style.

    ``family`` is the checkpoint's (a family name or :class:`FamilySpec`; ``.family`` keeps the name, ``.spec``
    the spec); ``image_size`` the side (or ``(height, width)``) images are resized to; ``image_length`` the
    placeholder count of a family told where its image goes (VisualGLM's, from the model config).
    """

    padding_side = "left"

    def __init__(self, tokenizer: Any, family: str | FamilySpec, *, image_size: int | Sequence[int] | None = None,
                 image_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.spec = family_spec(family)
        self.family = self.spec.name
        self.image_size = image_size
        self.image_length = image_length

    def __getattr__(self, name: str) -> Any:
        if name == "tokenizer":  # not set yet (e.g. while unpickling): do not recurse
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __len__(self) -> int:
        return len(self.tokenizer)

    # ------------------------------------------------------------------ text -> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``; special tokens as the reference adds them: ChatGLM appends ``[gMASK] <sop>``,
        GLM-4 prepends ``[gMASK] <sop>``."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        if self.spec.hf_tokenizer_template:
            ids = self.tokenizer.encode(text)
            return self.tokenizer.get_prefix_tokens() + ids if add_special_tokens else ids
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def __call__(self, text: str | Sequence[str], return_tensors: str | None = None, padding: bool | str = False,
                 add_special_tokens: bool = True, truncation: bool | None = None, max_length: int | None = None,
                 return_attention_mask: bool = True, **kwargs: Any) -> BatchEncoding:
        """``input_ids`` and ``attention_mask`` (and GLM-4's ``position_ids``) of a text or a list of texts."""
        refuse_extra(kwargs, "tokenizer()")
        if truncation:
            raise ValueError("truncation is not supported: a cut prompt loses ChatGLM's trailing [gMASK] <sop> "
                             "or GLM-4's chat markers; shorten the text instead")
        batched = not isinstance(text, str)
        texts = list(text) if batched else [text]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("tokenizer() takes a str or a non-empty list of str")
        rows = [self.encode(t, add_special_tokens) for t in texts]
        return self._pack(rows, batched, return_tensors, padding, max_length, return_attention_mask)

    # ------------------------------------------------------------------ chat template
    def apply_chat_template(self, conversation: Sequence[Any], add_generation_prompt: bool = False,
                            tokenize: bool = True, padding: bool | str = False, truncation: bool = False,
                            max_length: int | None = None, return_tensors: str | None = None,
                            return_dict: bool = False, add_special_tokens: bool = True, **kwargs: Any) -> Any:
        """The reference chat template of one conversation (a list of ``{"role", "content", "image"?}``
        dicts) or of a batch of them (a list of such lists). ``tokenize=False`` gives the text; otherwise
        ids, a ``[B, T]`` tensor with ``return_tensors="pt"``, or a :class:`BatchEncoding` with
        ``return_dict=True`` (the only form that carries the ``images``).

        GLM-4V-9B: its tokenizer's template (spec C5). ChatGLM-6B / VisualGLM-6B have no template in their
        reference tokenizer; here the one their ``chat()`` builds is used (user/assistant turns ending with
        a user message; VisualGLM's image in any user message, at most one)."""
        refuse_extra(kwargs, "apply_chat_template()")
        if truncation:
            raise ValueError("truncation is not supported: shorten the conversation instead")
        batched = bool(conversation) and all(isinstance(c, (list, tuple)) for c in conversation)
        conversations = list(conversation) if batched else [conversation]
        if not conversations or not all(conversations):
            raise ValueError("apply_chat_template needs a non-empty list of messages (or a list of such lists)")
        if not tokenize:
            texts = [self._template_text(c, add_generation_prompt, add_special_tokens) for c in conversations]
            return texts if batched else texts[0]
        built = [self._template_ids(c, add_generation_prompt, add_special_tokens) for c in conversations]
        rows = [ids for ids, _, _ in built]
        if not return_dict:
            if return_tensors is None:
                return rows if batched else rows[0]
            return self._pack(rows, True, return_tensors, padding, max_length, False)["input_ids"]
        encoding = self._pack(rows, batched, return_tensors, padding, max_length, True)
        images = [image for _, image, _ in built if image is not None]
        if images:
            encoding["images"] = torch.cat([self._pixels(image) for image in images])
        if self.spec.hf_image_prompt is not None and images:
            if len(images) != len(built):
                raise ValueError(f"{self.spec.display_name} batches need an image in every conversation or in none")
            starts = [start for _, _, start in built]
            encoding["pre_image_length"] = starts[0] if len(set(starts)) == 1 else starts
        return encoding

    def _template_ids(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
                      add_special_tokens: bool) -> tuple[list[int], Any, int | None]:
        """(ids, the conversation's image or None, the placeholder start of a family told where its image goes
        (``hf_image_prompt``) or None)."""
        if self.spec.hf_tokenizer_template:
            ids, image_index = self.tokenizer.apply_chat_template(messages, add_generation_prompt,
                                                                  add_special_tokens=add_special_tokens)
            # The template checked that at most one message has an image (None or "" count as none).
            image = None if image_index is None else next(m["image"] for m in messages if _has_image(m))
            return ids, image, None
        history, query, image = self._turns(messages, add_generation_prompt, add_special_tokens)
        if image is None:
            return self.tokenizer.encode(self.spec.hf_prompt_text(query, history)), None, None
        ids, start = self.spec.hf_image_prompt(self.tokenizer, query, history, self._image_length())
        return ids, image, start

    def _template_text(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
                       add_special_tokens: bool) -> str:
        if self.spec.hf_tokenizer_template:
            return self.tokenizer.chat_template_text(messages, add_generation_prompt,
                                                     add_special_tokens=add_special_tokens)
        history, query, image = self._turns(messages, add_generation_prompt, add_special_tokens)
        if image is not None:
            raise ValueError(f"a {self.spec.display_name} prompt with an image is not plain text: use tokenize=True")
        return self.spec.hf_prompt_text(query, history)

    def _turns(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, add_special_tokens: bool
               ) -> tuple[list[tuple[str, str]], str, Any]:
        """A tokenizer without a template (ChatGLM-6B's kind): the messages as (history pairs, query, image or
        None)."""
        name = self.spec.display_name
        if not add_generation_prompt:
            raise ValueError(f"{name}'s prompt always ends with the answer cue: pass add_generation_prompt=True")
        if not add_special_tokens:
            raise ValueError(f"{name} needs the [gMASK] <sop> its tokenizer appends: keep add_special_tokens=True")
        roles = [m.get("role") if isinstance(m, Mapping) else None for m in messages]
        expected = ["user" if k % 2 == 0 else "assistant" for k in range(len(messages))]
        if roles != expected or roles[-1] != "user":
            raise ValueError(f"{name}'s template takes user/assistant messages in turn, ending with a user "
                             f"message (no system role); got roles {roles}")
        texts = [m.get("content") or "" for m in messages]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("message content must be a string")
        images = [m["image"] for m in messages if m.get("image") is not None]
        if images and not self.spec.multimodal:
            raise ValueError(no_images_message(self.spec))
        if len(images) > 1:
            raise ValueError(f"only one image per conversation is supported ({name})")
        history = list(zip(texts[0:-1:2], texts[1:-1:2], strict=True))
        return history, texts[-1], images[0] if images else None

    def _image_length(self) -> int:
        if self.image_length is None:
            raise ValueError("the image placeholder count is unknown: load the tokenizer with "
                             "AutoTokenizer.from_pretrained(<model directory>)")
        return self.image_length

    def _pixels(self, image: Any) -> torch.Tensor:
        if self.image_size is None:
            raise ValueError("the image size is unknown: load the tokenizer with "
                             "AutoTokenizer.from_pretrained(<model directory>)")
        return preprocess(image, self.image_size)

    # ------------------------------------------------------------------ batching
    def _pack(self, rows: list[list[int]], batched: bool, return_tensors: str | None, padding: bool | str,
              max_length: int | None, attention_mask: bool) -> BatchEncoding:
        """Rows -> fields, left-padded to the longest row (``padding=True``) or to ``max_length``."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if padding not in _PADDING:
            raise ValueError(f"padding must be one of {_PADDING}, got {padding!r}")
        longest = max(len(r) for r in rows)
        if padding == "max_length":
            if max_length is None or max_length < longest:
                raise ValueError(f"padding='max_length' needs max_length >= the longest row ({longest} tokens), "
                                 f"got {max_length}")
            width: int | None = max_length
        elif padding in (True, "longest"):
            width = longest
        else:
            width = None
            if return_tensors == "pt" and len({len(r) for r in rows}) > 1:
                raise ValueError("the rows have different lengths: pass padding=True to pad them (on the left)")
        pad = self.tokenizer.pad_token_id
        gaps = [0 if width is None else width - len(r) for r in rows]
        fields: dict[str, list[list[int]]] = {"input_ids": [[pad] * g + r for g, r in zip(gaps, rows, strict=True)]}
        if attention_mask:
            fields["attention_mask"] = [[0] * g + [1] * len(r) for g, r in zip(gaps, rows, strict=True)]
        if self.spec.hf_tokenizer_template:  # GLM-4's reference tokenizer returns them
            fields["position_ids"] = [[0] * g + list(range(len(r))) for g, r in zip(gaps, rows, strict=True)]
        if return_tensors == "pt":
            return BatchEncoding({k: torch.tensor(v, dtype=torch.long) for k, v in fields.items()})
        return BatchEncoding(fields if batched else {k: v[0] for k, v in fields.items()})

    # ------------------------------------------------------------------ ids -> text
    def decode(self, token_ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> str:
        """Text of one id sequence (tensor or list). ChatGLM's special pieces and pads always decode to
        nothing (as its reference tokenizer); GLM-4's special tokens appear unless ``skip_special_tokens``."""
        refuse_extra(kwargs, "decode()")
        ids = id_list(token_ids)
        if self.spec.hf_tokenizer_template:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        cleanup = True if clean_up_tokenization_spaces is None else bool(clean_up_tokenization_spaces)
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=cleanup)

    def batch_decode(self, sequences: Any, **kwargs: Any) -> list[str]:
        """:meth:`decode` of each row of a ``[B, T]`` tensor or list of id lists."""
        return [self.decode(row, **kwargs) for row in sequences]


def no_images_message(spec: FamilySpec) -> str:
    """The error for images given to a text-only family, naming the families that take them."""
    multimodal = " or ".join(other.display_name for other in FAMILIES.values() if other.multimodal)
    return f"{spec.display_name} takes no images (use a {multimodal} checkpoint)"


def _has_image(message: Mapping[str, Any]) -> bool:
    """The GLM-4 template's rule: an ``image`` that is not None and not an empty string."""
    image = message.get("image")
    return image is not None and not (isinstance(image, (str, bytes)) and not image)


def unwrap(tokenizer: Any) -> Any:
    """The tokenizer ``ChatSession`` takes, from a :class:`CompatTokenizer` or an unwrapped one."""
    return tokenizer.tokenizer if isinstance(tokenizer, CompatTokenizer) else tokenizer
