"""GLM-4 / GLM-4V-9B tokenizer (tiktoken byte-level BPE), no ``transformers``.

Re-implements ``ChatGLM4Tokenizer`` from the glm-4v-9b ``tokenization_chatglm.py`` (spec C4, C5):

- ``tokenizer.model`` is a text file, one regular token a line: ``<base64 of the token bytes> <rank>``. It is loaded
  into a ``tiktoken.Encoding`` with the cl100k-like pre-tokenisation regex (digits in groups of 1-3) and NO special
  tokens inside tiktoken.
- The 14 special tokens (``SPECIAL_TOKENS``, standard order) get consecutive ids right after the regular ranks
  (151329.. for the real file), or the ids of a ``tokenizer_config.json`` ``added_tokens_decoder`` / an explicit
  ``special_ids`` mapping (the golden tiny tokenizer puts them at V-16+k).
- Text is always encoded as plain text: a user typing ``<|user|>`` gets ordinary byte-level ids, never the special id.
- ``apply_chat_template`` builds ids the way the reference does, piece by piece:
  ``[gMASK] <sop>`` then, per message, ``[<|role|>] + encode(f"{metadata}\\n") + [boi, eos, eoi]? + encode(content)``
  (three separate tiktoken calls, so BPE never merges across the role's newline and the content), then
  ``<|assistant|>`` as the generation prompt. A message with neither content nor image is skipped entirely (the
  reference's ``if message or message_prefix``), role token included.
- ``decode`` concatenates token bytes and decodes UTF-8 with ``errors="replace"``; special ids decode to their token
  strings (the text between two special tokens is decoded on its own, as HF does for added tokens).

Differences from the reference, on purpose: roles are checked for every message (ValueError instead of ``assert``),
a second image raises ValueError instead of AssertionError, a ``tools`` entry raises ValueError (GLM-4V-9B does not
support tools), ``metadata=None`` counts as "", and the caller's messages are never mutated. ``vocab_size`` here is
the embedding-table size needed (largest id + 1), whereas the reference's ``vocab_size`` counts regular tokens only
(that number is ``num_regular_tokens``).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken

from visualglm.config import read_json_object

VOCAB_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"

# Pre-tokenisation regex of the reference (spec C4).
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
ROLES: tuple[str, ...] = ("system", "user", "assistant", "observation")
BOI_TOKEN = "<|begin_of_image|>"
EOI_TOKEN = "<|end_of_image|>"
EOS_TOKEN = "<|endoftext|>"
# What the reference puts after the role's "\n" for the (single) image: boi, one eos placeholder, eoi.
IMAGE_PLACEHOLDER_TOKENS: tuple[str, ...] = (BOI_TOKEN, EOS_TOKEN, EOI_TOKEN)

PathLike = str | os.PathLike


def load_ranks(path: PathLike) -> dict[bytes, int]:
    """Read a tiktoken base64-ranks file; FileNotFoundError / ValueError name the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLM-4 tokenizer ranks file not found: {path}")
    ranks: dict[bytes, int] = {}
    seen_ranks: dict[int, bytes] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"GLM-4 tokenizer ranks file {path} is not a text file: {exc}") from exc
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(
                f"corrupt GLM-4 tokenizer ranks file {path}, line {lineno}: "
                f"expected '<base64> <rank>', got {line!r:.80}"
            )
        token_b64, rank_text = fields
        try:
            token = base64.b64decode(token_b64, validate=True)
            rank = int(rank_text)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"corrupt GLM-4 tokenizer ranks file {path}, line {lineno}: {exc}") from exc
        if not token or rank < 0:
            raise ValueError(f"corrupt GLM-4 tokenizer ranks file {path}, line {lineno}: empty token or negative rank")
        if token in ranks:
            raise ValueError(f"corrupt GLM-4 tokenizer ranks file {path}, line {lineno}: token {token!r} repeated")
        if rank in seen_ranks:
            raise ValueError(f"corrupt GLM-4 tokenizer ranks file {path}, line {lineno}: rank {rank} repeated")
        ranks[token] = rank
        seen_ranks[rank] = token
    if not ranks:
        raise ValueError(f"corrupt GLM-4 tokenizer ranks file {path}: no tokens")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"corrupt GLM-4 tokenizer ranks file {path}: {len(missing)} of the 256 single bytes have no token "
            f"(first missing: {missing[0]:#04x}); a byte-level BPE needs all of them"
        )
    return ranks


def special_ids_from_config(path: PathLike) -> dict[str, int] | None:
    """The special-token ids of a ``tokenizer_config.json``'s ``added_tokens_decoder``, or None when it has none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLM-4 tokenizer config not found: {path}")
    decoder = read_json_object(path).get("added_tokens_decoder")
    if not decoder:
        return None
    found: dict[str, int] = {}
    try:
        for id_text, entry in decoder.items():
            content = entry["content"] if isinstance(entry, dict) else entry
            if content in SPECIAL_TOKENS:
                found[content] = int(id_text)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"corrupt added_tokens_decoder in {path}: {exc}") from exc
    missing = [t for t in SPECIAL_TOKENS if t not in found]
    if missing:
        raise ValueError(f"added_tokens_decoder in {path} lacks GLM-4 special tokens: {missing}")
    return found


class GLM4Tokenizer:
    """tiktoken-based GLM-4 tokenizer with the glm-4v-9b chat template (see the module docstring)."""

    def __init__(
        self,
        vocab_file: PathLike,
        special_ids: Mapping[str, int] | None = None,
        *,
        image_size: int | None = None,
    ) -> None:
        self.vocab_file = Path(vocab_file)
        self.mergeable_ranks = load_ranks(self.vocab_file)
        self.image_size = image_size
        self.num_regular_tokens = len(self.mergeable_ranks)
        self._decoder: dict[int, bytes] = {rank: token for token, rank in self.mergeable_ranks.items()}
        max_rank = max(self._decoder)

        if special_ids is None:
            special = {tok: max_rank + 1 + k for k, tok in enumerate(SPECIAL_TOKENS)}
        else:
            unknown = sorted(set(special_ids) - set(SPECIAL_TOKENS))
            missing = [t for t in SPECIAL_TOKENS if t not in special_ids]
            if unknown or missing:
                raise ValueError(
                    f"special_ids must give exactly the GLM-4 special tokens; missing {missing}, unknown {unknown}"
                )
            special = {tok: int(special_ids[tok]) for tok in SPECIAL_TOKENS}
        ids = list(special.values())
        if len(set(ids)) != len(ids):
            raise ValueError(f"special token ids repeat: {special}")
        clash = {tok: i for tok, i in special.items() if i < 0 or i in self._decoder}
        if clash:
            raise ValueError(
                f"special token ids clash with regular ranks of {self.vocab_file} (or are negative): {clash}"
            )
        self.special_tokens: dict[str, int] = special
        self._special_by_id: dict[int, str] = {i: tok for tok, i in special.items()}

        try:
            self._encoding = tiktoken.Encoding(
                name=f"glm4:{self.vocab_file.name}",
                pat_str=PAT_STR,
                mergeable_ranks=self.mergeable_ranks,
                special_tokens={},
            )
        except Exception as exc:  # tiktoken raises assorted errors (ValueError, pyo3 panics) on bad vocabularies
            raise ValueError(
                f"GLM-4 tokenizer ranks file {self.vocab_file} cannot be loaded by tiktoken: {exc}"
            ) from exc

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: PathLike,
        *,
        vocab_file: PathLike | None = None,
        config_file: PathLike | None = None,
        special_ids: Mapping[str, int] | None = None,
    ) -> GLM4Tokenizer:
        """Load from a directory (``tokenizer.model`` + optional ``tokenizer_config.json``) or a ranks file.

        ``vocab_file`` / ``config_file`` override the file names; relative ones are taken inside ``path`` when it is
        a directory (e.g. ``vocab_file="tiny_tokenizer.model", config_file="tiny_tokenizer_config.json"``). Special
        ids come from ``special_ids``, else the config's ``added_tokens_decoder``, else consecutive after the ranks.
        """
        path = Path(path)
        base = path if path.is_dir() else path.parent
        if vocab_file is not None:
            vocab_path = Path(vocab_file)
            if not vocab_path.is_absolute() and path.is_dir():
                vocab_path = base / vocab_path
        elif path.is_dir():
            vocab_path = path / VOCAB_FILE
        else:
            vocab_path = path
        if not vocab_path.is_file():
            raise FileNotFoundError(f"GLM-4 tokenizer ranks file not found: {vocab_path}")

        image_size = None
        if config_file is not None:
            config_path: Path | None = Path(config_file)
            if not config_path.is_absolute() and path.is_dir():
                config_path = base / config_path
            if not config_path.is_file():
                raise FileNotFoundError(f"GLM-4 tokenizer config not found: {config_path}")
        else:
            config_path = base / CONFIG_FILE if (base / CONFIG_FILE).is_file() else None
        if config_path is not None:
            if special_ids is None:
                special_ids = special_ids_from_config(config_path)
            config = read_json_object(config_path)
            if isinstance(config.get("image_size"), int):
                image_size = config["image_size"]
        return cls(vocab_path, special_ids, image_size=image_size)

    # ------------------------------------------------------------------ ids
    def __len__(self) -> int:
        return self.num_regular_tokens + len(self.special_tokens)

    @property
    def vocab_size(self) -> int:
        """Largest id + 1 (the embedding rows needed); 151343 for the real GLM-4 file."""
        return max(max(self._decoder), max(self._special_by_id)) + 1

    def convert_tokens_to_ids(self, tokens: str | bytes | Sequence[str | bytes]) -> int | list[int]:
        """Special-token strings (or regular token bytes) to ids; a list maps element-wise."""
        if isinstance(tokens, (str, bytes)):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: str | bytes) -> int:
        if isinstance(token, str):
            if token in self.special_tokens:
                return self.special_tokens[token]
            raise ValueError(f"{token!r} is not a GLM-4 special token (regular tokens are given as bytes)")
        if token in self.mergeable_ranks:
            return self.mergeable_ranks[token]
        raise ValueError(f"{token!r} is not a token of {self.vocab_file}")

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | bytes | list[str | bytes]:
        """Ids to tokens: special ids give their strings, regular ids their bytes."""
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(int(i)) for i in ids]

    def _id_to_token(self, i: int) -> str | bytes:
        if i in self._special_by_id:
            return self._special_by_id[i]
        if i in self._decoder:
            return self._decoder[i]
        raise ValueError(f"token id {i} is out of range for the GLM-4 tokenizer (vocab_size {self.vocab_size})")

    def is_special_id(self, i: int) -> bool:
        return i in self._special_by_id

    def known_ids(self) -> list[int]:
        """Every id this tokenizer can decode (regular ranks and specials), sorted."""
        return sorted({*self._decoder, *self._special_by_id})

    @property
    def eos_token_id(self) -> int:
        return self.special_tokens[EOS_TOKEN]

    @property
    def pad_token_id(self) -> int:
        return self.special_tokens[EOS_TOKEN]

    @property
    def mask_token_id(self) -> int:
        return self.special_tokens["[MASK]"]

    @property
    def gmask_token_id(self) -> int:
        return self.special_tokens["[gMASK]"]

    @property
    def sop_token_id(self) -> int:
        return self.special_tokens["<sop>"]

    @property
    def eop_token_id(self) -> int:
        return self.special_tokens["<eop>"]

    @property
    def system_token_id(self) -> int:
        return self.special_tokens["<|system|>"]

    @property
    def user_token_id(self) -> int:
        return self.special_tokens["<|user|>"]

    @property
    def assistant_token_id(self) -> int:
        return self.special_tokens["<|assistant|>"]

    @property
    def observation_token_id(self) -> int:
        return self.special_tokens["<|observation|>"]

    @property
    def boi_token_id(self) -> int:
        return self.special_tokens[BOI_TOKEN]

    @property
    def eoi_token_id(self) -> int:
        return self.special_tokens[EOI_TOKEN]

    @property
    def stop_token_ids(self) -> list[int]:
        """The chat stop ids of the reference (spec C7): eos, ``<|user|>``, ``<|observation|>``."""
        return [self.eos_token_id, self.user_token_id, self.observation_token_id]

    def role_token_id(self, role: str) -> int:
        if role not in ROLES:
            raise ValueError(f"unknown GLM-4 chat role {role!r}; expected one of {ROLES}")
        return self.special_tokens[f"<|{role}|>"]

    # ------------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        """Plain text to regular ids; special-token strings in ``text`` stay plain text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._encoding.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Concatenate token bytes and decode UTF-8 (errors='replace'); special ids become their strings."""
        pieces: list[str] = []
        buffer = bytearray()
        for raw in ids:
            i = int(raw)
            special = self._special_by_id.get(i)
            if special is not None:
                if buffer:
                    pieces.append(buffer.decode("utf-8", errors="replace"))
                    buffer.clear()
                if not skip_special_tokens:
                    pieces.append(special)
                continue
            token = self._decoder.get(i)
            if token is None:
                raise ValueError(f"token id {i} is out of range for the GLM-4 tokenizer (vocab_size {self.vocab_size})")
            buffer += token
        if buffer:
            pieces.append(buffer.decode("utf-8", errors="replace"))
        return "".join(pieces)

    # ------------------------------------------------------------------ chat template
    def get_prefix_tokens(self) -> list[int]:
        return [self.gmask_token_id, self.sop_token_id]

    def image_placeholder_ids(self) -> list[int]:
        return [self.special_tokens[t] for t in IMAGE_PLACEHOLDER_TOKENS]

    def build_single_message(self, role: str, metadata: str, content: str, *, image: bool = False) -> list[int]:
        """``[<|role|>] + encode(metadata + "\\n") [+ boi eos eoi] + encode(content)`` (reference order)."""
        ids = [self.role_token_id(role)]
        ids += self.encode(f"{metadata}\n")
        if image:
            ids += self.image_placeholder_ids()
        ids += self.encode(content)
        return ids

    @staticmethod
    def _has_image(message: Mapping[str, Any]) -> bool:
        image = message.get("image")
        if image is None:
            return False
        if isinstance(image, (str, bytes)):
            return len(image) > 0
        return True

    def _check_messages(self, messages: Sequence[Mapping[str, Any]]) -> None:
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ValueError("messages must be a list of dicts with 'role' and 'content'")
        images = 0
        for k, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise ValueError(f"message {k} is not a dict: {message!r:.80}")
            if message.get("tools"):
                raise ValueError("GLM-4V chat template: 'tools' are not supported")
            role = message.get("role")
            if role not in ROLES:
                raise ValueError(f"message {k}: unknown GLM-4 chat role {role!r}; expected one of {ROLES}")
            content = message.get("content")
            if content is not None and not isinstance(content, str):
                raise ValueError(f"message {k}: content must be a string, got {type(content).__name__}")
            metadata = message.get("metadata")
            if metadata is not None and not isinstance(metadata, str):
                raise ValueError(f"message {k}: metadata must be a string, got {type(metadata).__name__}")
            if self._has_image(message):
                images += 1
                if images > 1:
                    raise ValueError(f"message {k}: only one image per conversation is supported (GLM-4V-9B)")

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        add_special_tokens: bool = True,
    ) -> tuple[list[int], int | None]:
        """Token ids of a conversation (spec C5) and the index of ``<|begin_of_image|>`` (None without an image).

        Messages are dicts ``{"role", "content", "metadata"?, "image"?}``; only the presence of ``image`` matters
        here. A message with empty content and no image is skipped (reference behaviour).
        """
        self._check_messages(messages)
        ids = self.get_prefix_tokens() if add_special_tokens else []
        image_index: int | None = None
        for message in messages:
            has_image = self._has_image(message)
            content = message.get("content") or ""
            if not content and not has_image:
                continue
            if has_image:
                start = len(ids)
                ids += self.build_single_message(message["role"], message.get("metadata") or "", content, image=True)
                image_index = ids.index(self.boi_token_id, start)
            else:
                ids += self.build_single_message(message["role"], message.get("metadata") or "", content)
        if add_generation_prompt:
            ids.append(self.assistant_token_id)
        return ids, image_index

    def chat_template_text(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        add_special_tokens: bool = True,
    ) -> str:
        """The reference's ``apply_chat_template(tokenize=False)`` string (which leaves out the image placeholders)."""
        self._check_messages(messages)
        text = "[gMASK]<sop>" if add_special_tokens else ""
        for message in messages:
            content = message.get("content") or ""
            if not content and not self._has_image(message):
                continue
            text += f"<|{message['role']}|>{message.get('metadata') or ''}\n{content}"
        if add_generation_prompt:
            text += "<|assistant|>"
        return text

    def pad(self, batch: Sequence[Sequence[int]], max_length: int | None = None) -> dict[str, list[list[int]]]:
        """Left-pad a batch like the reference ``_pad``: pad id, attention_mask 0 on pads, position_ids 0 on pads."""
        longest = max((len(x) for x in batch), default=0)
        target = longest if max_length is None else max_length
        if target < longest:
            raise ValueError(f"max_length {max_length} is shorter than the longest sequence ({longest})")
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "position_ids": []}
        for seq in batch:
            n = len(seq)
            gap = target - n
            out["input_ids"].append([self.pad_token_id] * gap + [int(i) for i in seq])
            out["attention_mask"].append([0] * gap + [1] * n)
            out["position_ids"].append([0] * gap + list(range(n)))
        return out
