"""ChatGLM-6B tokenizer (THUDM/chatglm-6b, first generation; also used by VisualGLM-6B), no ``transformers``.

Re-implements ``ChatGLMTokenizer`` from the official ``tokenization_chatglm.py`` as it behaves under
transformers 4.30.2 (spec A4), on SentencePiece and ``ice_text.model``:

- Text is normalised before SentencePiece: ``\\n`` -> ``<n>``, ``\\t`` -> ``<|tab|>``, runs of 2..80 spaces ->
  ``<|blank_N|>`` (longest first), because the vocab has pieces for them; decoding maps them back.
- A token id is the SentencePiece id + ``num_image_tokens``. The reference class defaults to 20000 (the
  original release reserved ids for ``<image_k>``), but every released ``tokenizer_config.json`` sets 0, so
  our default is 0 as well; ``from_pretrained`` reads the value from the config when there is one.
- ``encode`` appends ``[gMASK] <sop>`` at the END of the prompt, as ChatGLM-6B expects.

Known differences from the reference: literal special-token strings typed in the text (``<sop>``, ``[MASK]``,
...) are encoded as plain text, whereas HF splits some of them out as single tokens; ids below
``num_image_tokens`` are dropped by ``decode`` (the reference's ``SPTokenizer.decode`` rule). Attention masks
and position ids are the model module's job, so ``pad_batch`` only pads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

VOCAB_FILE = "ice_text.model"
CONFIG_FILE = "tokenizer_config.json"
MAX_BLANK_LENGTH = 80
NEWLINE_PIECE = "<n>"
TAB_PIECE = "<|tab|>"
SPECIAL_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
# Pieces looked up by name (never hard-coded ids, so a tiny test vocab works); without them no ChatGLM input.
_REQUIRED_PIECES = ("<unk>", "<pad>", NEWLINE_PIECE, "[MASK]", "[gMASK]", "<sop>", "<eop>")
# transformers' clean_up_tokenization (4.30), which the reference decode applies by default.
_CLEANUP = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip


def blank_piece(n: int) -> str:
    """The piece for a run of ``n`` (2..80) spaces."""
    return f"<|blank_{n}|>"


def encode_whitespace(text: str, max_blank_length: int = MAX_BLANK_LENGTH) -> str:
    """Replace newlines, tabs and space runs by their pieces (the reference's ``SPTokenizer._preprocess``).

    Longest runs first, so 5 spaces become ``<|blank_5|>`` rather than ``<|blank_2|><|blank_3|>``; a run
    longer than the maximum is cut into maximal pieces plus a shorter remainder.
    """
    text = text.replace("\n", NEWLINE_PIECE).replace("\t", TAB_PIECE)
    for n in range(max_blank_length, 1, -1):
        text = text.replace(" " * n, blank_piece(n))
    return text


def decode_whitespace(text: str, max_blank_length: int = MAX_BLANK_LENGTH) -> str:
    """Inverse of :func:`encode_whitespace` on decoded text (the reference's ``SPTokenizer.postprocess``)."""
    text = text.replace(NEWLINE_PIECE, "\n").replace(TAB_PIECE, "\t")
    for n in range(2, max_blank_length + 1):
        text = text.replace(blank_piece(n), " " * n)
    return text


class ChatGLMTokenizer:
    """SentencePiece tokenizer with ChatGLM-6B's normalisation, id offset and special tokens."""

    def __init__(
        self,
        vocab_file: str | os.PathLike[str],
        *,
        num_image_tokens: int = 0,
        do_lower_case: bool = False,
        remove_space: bool = False,
        max_blank_length: int = MAX_BLANK_LENGTH,
    ) -> None:
        path = Path(vocab_file)
        if not path.is_file():
            raise FileNotFoundError(f"ChatGLM vocab file not found: {path}")
        if type(num_image_tokens) is not int or num_image_tokens < 0:  # bool is an int subclass: reject it
            raise ValueError(f"num_image_tokens must be a non-negative int, got {num_image_tokens!r}")
        try:
            # Loading from bytes (not a path) sidesteps SentencePiece's own path handling and its error text.
            self.sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
        except RuntimeError as e:
            raise ValueError(f"{path} is not a valid SentencePiece model file: {e}") from e
        if self.sp.get_piece_size() == 0:
            raise ValueError(f"{path} is not a valid SentencePiece model file: it holds no pieces")
        for piece in _REQUIRED_PIECES:
            if self.sp.id_to_piece(self.sp.piece_to_id(piece)) != piece:
                raise ValueError(f"{path} is not a ChatGLM vocab: it lacks the piece {piece!r}")
        self.vocab_file = path
        self.num_image_tokens = num_image_tokens
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.max_blank_length = max_blank_length

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], **overrides: Any) -> ChatGLMTokenizer:
        """Load from a directory holding ``ice_text.model`` and optionally ``tokenizer_config.json``.

        The config's ``vocab_file``, ``num_image_tokens``, ``do_lower_case`` and ``remove_space`` are
        honoured; keyword ``overrides`` win over the config.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {directory} (should hold {VOCAB_FILE})")
        config: dict[str, Any] = {}
        config_path = directory / CONFIG_FILE
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{config_path} is not valid JSON: {e}") from e
            if not isinstance(config, dict):
                raise ValueError(f"{config_path} must hold a JSON object")
        # HF configs may carry a stale absolute vocab path from the saving machine: use the name only.
        names = [Path(config["vocab_file"]).name] if isinstance(config.get("vocab_file"), str) else []
        names.append(VOCAB_FILE)
        vocab_path = next((directory / n for n in names if (directory / n).is_file()), None)
        if vocab_path is None:
            raise FileNotFoundError(f"no ChatGLM vocab file {names[0]!r} in tokenizer directory {directory}")
        keys = ("num_image_tokens", "do_lower_case", "remove_space", "max_blank_length")
        kwargs = {k: config[k] for k in keys if config.get(k) is not None}
        return cls(vocab_path, **{**kwargs, **overrides})

    # ----- sizes and special ids (all shifted by num_image_tokens, like every other id) -----
    @property
    def vocab_size(self) -> int:
        """SentencePiece size + ``num_image_tokens`` (130344 for the released ``ice_text.model``)."""
        return self.sp.get_piece_size() + self.num_image_tokens

    def known_ids(self) -> range:
        """Every id this tokenizer can decode."""
        return range(self.num_image_tokens, self.vocab_size)

    def __len__(self) -> int:
        return self.vocab_size

    def _piece_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece) + self.num_image_tokens

    @property
    def bos_token_id(self) -> int:
        return self._piece_id("<sop>")

    @property
    def eos_token_id(self) -> int:
        return self._piece_id("<eop>")

    @property
    def pad_token_id(self) -> int:
        return self._piece_id("<pad>")

    @property
    def unk_token_id(self) -> int:
        return self._piece_id("<unk>")

    @property
    def mask_token_id(self) -> int:
        return self._piece_id("[MASK]")

    @property
    def gmask_token_id(self) -> int:
        return self._piece_id("[gMASK]")

    # ----- encoding -----
    def _normalise(self, text: str) -> str:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return encode_whitespace(text, self.max_blank_length)

    def tokenize(self, text: str, add_dummy_prefix: bool = True) -> list[str]:
        """SentencePiece pieces of ``text`` after normalisation (no special tokens added)."""
        text = self._normalise(text)
        if add_dummy_prefix:
            return self.sp.encode_as_pieces(text)
        # SentencePiece always inserts its dummy "▁"; the reference gets rid of it by encoding "<n>" + text
        # (-> "▁", "<n>", ...) and dropping the first two pieces.
        return self.sp.encode_as_pieces(NEWLINE_PIECE + text)[2:]

    def encode(self, text: str, add_special_tokens: bool = True, add_dummy_prefix: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` ``[gMASK], <sop>`` are appended at the end."""
        text = self._normalise(text)
        if add_dummy_prefix:
            sp_ids = self.sp.encode_as_ids(text)
        else:
            sp_ids = self.sp.encode_as_ids(NEWLINE_PIECE + text)[2:]
        ids = [i + self.num_image_tokens for i in sp_ids]
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def build_inputs_with_special_tokens(self, ids_a: list[int], ids_b: list[int] | None = None) -> list[int]:
        """``a + [gMASK] + <sop>``, and ``+ b + <eop>`` for a pair (the reference's rule)."""
        ids = list(ids_a) + [self.gmask_token_id, self.bos_token_id]
        if ids_b is not None:
            ids += list(ids_b) + [self.eos_token_id]
        return ids

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Piece(s) to id(s); unknown pieces give ``unk_token_id``, ``<image_k>`` k (k < num_image_tokens)."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: str) -> int:
        if token.startswith("<image_") and token.endswith(">") and token[7:-1].isdigit():
            if int(token[7:-1]) < self.num_image_tokens:
                return int(token[7:-1])
        return self._piece_id(token)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """Id(s) to piece(s); ids below ``num_image_tokens`` map to ``<image_k>`` like the reference."""
        return [self._id_to_token(i) for i in ids] if isinstance(ids, Iterable) else self._id_to_token(ids)

    def _id_to_token(self, idx: int) -> str:
        idx = int(idx)
        if idx < self.num_image_tokens:
            return f"<image_{idx}>"
        self._check_range(idx)
        return self.sp.id_to_piece(idx - self.num_image_tokens)

    def _check_range(self, idx: int) -> None:
        # SentencePiece raises a bare IndexError; the embedding has rows past the vocab (130528 > 130344).
        if not 0 <= idx < self.vocab_size:
            raise ValueError(f"token id {idx} is outside the vocabulary [0, {self.vocab_size})")

    # ----- decoding -----
    def decode(self, ids: int | Iterable[int], clean_up_tokenization_spaces: bool = True) -> str:
        """Text of ``ids``: pads dropped, special pieces ([gMASK], <sop>, ...) decode to nothing.

        ``clean_up_tokenization_spaces`` (default True, like transformers 4.30 which the reference relies on)
        removes a space before ``. ? ! ,`` and English contractions. The golden cases cannot tell whether it
        applies (none has such a pattern), so we follow the reference.
        """
        if not isinstance(ids, Iterable):
            ids = [ids]
        pad = self.pad_token_id
        sp_ids = [int(i) - self.num_image_tokens for i in ids if int(i) != pad]
        sp_ids = [i for i in sp_ids if i >= 0]
        for i in sp_ids:
            self._check_range(i + self.num_image_tokens)
        text = decode_whitespace(self.sp.decode(sp_ids), self.max_blank_length)
        if clean_up_tokenization_spaces:
            for old, new in _CLEANUP:
                text = text.replace(old, new)
        return text

    # ----- batching -----
    def pad_batch(
        self, batch: Sequence[Sequence[int]], pad_id: int | None = None
    ) -> tuple[list[list[int]], list[int]]:
        """Left-pad id lists to the longest (the reference pads left so every prompt ends in ``<sop>``).

        Returns the padded rows and the number of pads put in front of each row.
        """
        pad = self.pad_token_id if pad_id is None else pad_id
        width = max((len(row) for row in batch), default=0)
        num_pad = [width - len(row) for row in batch]
        return [[pad] * n + list(row) for n, row in zip(num_pad, batch, strict=True)], num_pad
