"""Streaming detokenisation: token ids in, text deltas out, exactly equal to a one-shot decode.

Three composable pieces, all fed incrementally and all exact (the concatenation of their outputs equals
the one-shot result on the whole input, whatever the chunking):

- :class:`IncrementalDetokenizer`: ids -> text. ``"".join(pushes) + flush() == tokenizer.decode(ids)``.
  Each step decodes only a short window of ids (the prefix/read-offset technique of HF's
  ``TextIteratorStreamer`` / vLLM): ``decode(ids[p:])`` minus the part of it already emitted. A window
  never starts at the very beginning of a word (SentencePiece would drop its ``▁`` space), nor inside a
  multi-byte character, nor inside a piece of text that may still be rewritten. Text that may still
  change is held back: a trailing U+FFFD (an incomplete UTF-8 sequence from byte pieces such as
  ``<0xE4>``, or an incomplete tiktoken byte run), a tail that could grow into one of the tokenizer's
  textual patterns (ChatGLM's ``<n>``, ``<|tab|>``, ``<|blank_N|>``, which its decode rewrites on the
  text), and a tail that HF's ``clean_up_tokenization`` (``" ."`` -> ``"."``, ``" n't"`` -> ``"n't"``,
  ...) could still rewrite. The clean-up is done here as a cascade of streaming ``str.replace`` stages on
  the tokenizer's raw decode, which reproduces the sequential replaces of the one-shot decode exactly.
  Only ``tokenizer.decode(ids)`` (and optionally its ``clean_up_tokenization_spaces`` keyword) is used, so
  any tokenizer plugs in (GLM-4's tiktoken one decodes bytes with ``errors="replace"``, spec C4).
- :class:`StopStringMatcher`: text -> text up to (not including) the first stop string; a tail that may
  still become a stop string is held back, so nothing is ever emitted and then taken back.
- :class:`StreamPostprocessor`: an answer's post-processing applied to a stream, in one of the
  :data:`POSTPROCESS_STYLES` (a family's spec names its style): ``"strip"`` (GLM-4's ``process_response``
  for plain answers) or ``"full-width"`` (ChatGLM-6B's, spec A7, :func:`postprocess_chatglm`).

:class:`DecodeStream` chains them: ids -> detokenizer -> stop strings -> post-processing.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

REPLACEMENT_CHAR = "\ufffd"

# transformers' ``clean_up_tokenization`` (4.30), applied in this order by the ChatGLM-6B decode.
HF_CLEANUP: tuple[tuple[str, str], ...] = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip

# ChatGLM-6B ``process_response`` (THUDM/chatglm-6b modeling_chatglm.py): ASCII punctuation next to a
# CJK ideograph becomes full width.
CHATGLM_PUNCTUATION: tuple[tuple[str, str], ...] = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))
CHATGLM_TRAINING_TIME = ("[[训练时间]]", "2023年")
_CJK_FIRST, _CJK_LAST = "\u4e00", "\u9fff"


class TextStage(Protocol):
    """A streaming text transform: ``feed`` returns the output delta; ``flush`` ends the stream."""

    def feed(self, text: str) -> str: ...

    def flush(self) -> str: ...


def _longest_held_suffix(text: str, prefixes: frozenset[str], max_len: int) -> int:
    """Length of the longest suffix of ``text`` that is in ``prefixes`` (0 if none)."""
    for k in range(min(max_len, len(text)), 0, -1):
        if text[-k:] in prefixes:
            return k
    return 0


def _proper_prefixes(patterns: Iterable[str]) -> tuple[frozenset[str], int]:
    prefixes = frozenset(p[:k] for p in patterns for k in range(1, len(p)))
    return prefixes, max((len(p) for p in prefixes), default=0)


# ----------------------------------------------------------------------------- generic text stages
class StreamReplace:
    """Streaming ``str.replace(old, new)``: the outputs concatenate to ``whole_input.replace(old, new)``.

    A tail of the input that is a proper prefix of ``old`` is held back until the next input (or ``flush``)
    tells whether it completes ``old``; occurrences are replaced leftmost first and never overlap, like
    ``str.replace``.
    """

    def __init__(self, old: str, new: str) -> None:
        if not old:
            raise ValueError("StreamReplace needs a non-empty string to replace")
        self.old, self.new = old, new
        self._prefixes, self._max = _proper_prefixes([old])
        self._held = ""

    def feed(self, text: str) -> str:
        buf = self._held + text
        if not buf:
            return ""
        out = []
        start = 0
        while (found := buf.find(self.old, start)) >= 0:
            out += (buf[start:found], self.new)
            start = found + len(self.old)
        rest = buf[start:]
        keep = _longest_held_suffix(rest, self._prefixes, self._max)
        self._held = rest[len(rest) - keep:]
        out.append(rest[: len(rest) - keep])
        return "".join(out)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class StagePipeline:
    """Several :class:`TextStage` in series (each one's output is the next one's input)."""

    def __init__(self, stages: Sequence[TextStage]) -> None:
        self.stages = list(stages)

    def feed(self, text: str) -> str:
        for stage in self.stages:
            text = stage.feed(text)
        return text

    def flush(self) -> str:
        text = ""
        for stage in self.stages:
            text = stage.feed(text) + stage.flush() if text else stage.flush()
        return text


def cleanup_stage(rules: Sequence[tuple[str, str]] = HF_CLEANUP) -> StagePipeline:
    """Streaming ``clean_up_tokenization``: the replaces of ``rules`` applied in order, exactly."""
    return StagePipeline([StreamReplace(old, new) for old, new in rules])


# ----------------------------------------------------------------------------- detokenizer
def default_hold_patterns(tokenizer: Any) -> tuple[str, ...]:
    """Text patterns the tokenizer's ``decode`` rewrites on the decoded *text* (not per piece).

    A tokenizer may list them in a ``stream_hold_patterns`` attribute; otherwise a ChatGLM-6B tokenizer is
    recognised by its ``max_blank_length`` (its decode turns ``<n>``, ``<|tab|>`` and ``<|blank_N|>``
    into whitespace even when the model spelled them with several pieces).
    """
    explicit = getattr(tokenizer, "stream_hold_patterns", None)
    if explicit is not None:
        return tuple(explicit)
    max_blank = getattr(tokenizer, "max_blank_length", None)
    if isinstance(max_blank, int) and not isinstance(max_blank, bool):
        return ("<n>", "<|tab|>", *(f"<|blank_{n}|>" for n in range(2, max_blank + 1)))
    return ()


def _decode_cleans_up(tokenizer: Any) -> bool | None:
    """Whether ``tokenizer.decode`` cleans up by default; None when it has no such keyword."""
    try:
        params = inspect.signature(tokenizer.decode).parameters
    except (TypeError, ValueError):
        return None
    param = params.get("clean_up_tokenization_spaces")
    if param is None:
        return None
    if isinstance(param.default, bool):
        return param.default
    return bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))


class IncrementalDetokenizer:
    """Token ids in, one at a time; text deltas out. ``"".join(deltas) == tokenizer.decode(all_ids)``.

    ``push(token_id)`` returns the text that became final with this token (often ``""``); ``flush()``
    returns whatever was held back (call it once, at the end). No delta holds a broken multi-byte
    character: U+FFFD appears only where the full decode has it too (invalid bytes that no later token
    completed, released by ``flush`` or by the next text).

    ``clean_up_tokenization_spaces``: None mirrors the tokenizer's ``decode`` default. When clean-up is on,
    the tokenizer is asked for the raw text (``clean_up_tokenization_spaces=False``) and the clean-up is
    streamed here, exactly. ``hold_patterns``: strings the tokenizer's decode rewrites on the text (see
    :func:`default_hold_patterns`, the default).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        clean_up_tokenization_spaces: bool | None = None,
        hold_patterns: Iterable[str] | None = None,
    ) -> None:
        cleans_up = _decode_cleans_up(tokenizer)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = bool(cleans_up)
        if cleans_up is None:
            if clean_up_tokenization_spaces:
                raise ValueError("the tokenizer's decode has no clean_up_tokenization_spaces keyword")
            self._decode: Callable[[list[int]], str] = tokenizer.decode
        else:
            self._decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        self._cleanup = cleanup_stage() if clean_up_tokenization_spaces else None
        patterns = default_hold_patterns(tokenizer) if hold_patterns is None else tuple(hold_patterns)
        self._prefixes, self._max_prefix = _proper_prefixes(p for p in patterns if p)
        self.ids: list[int] = []
        self._parts: list[str] = []  # emitted deltas
        self._raw_parts: list[str] = []  # emitted raw text (before clean-up), for a resync
        # Window: decode(ids[_start:]) begins with _window_done, all of it already emitted.
        self._start = 0
        self._read = 0  # ids[:_read] were all decoded and emitted at the last window move
        self._window_done = ""
        self.resyncs = 0  # times the window disagreed with itself and a full decode was needed
        self.finished = False

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._parts)

    def _stable_length(self, text: str) -> int:
        """Length of the prefix of ``text`` that no later token can change."""
        end = len(text.rstrip(REPLACEMENT_CHAR))
        if end < len(text):
            return end  # incomplete byte sequence (a pattern prefix cannot contain U+FFFD)
        return end - _longest_held_suffix(text, self._prefixes, self._max_prefix)

    def _window_text(self) -> str:
        """``decode(ids[_start:])``; it begins with ``_window_done`` (else a full-decode resync)."""
        text = self._decode(self.ids[self._start:])
        if text.startswith(self._window_done):
            return text
        # Not expected (the window only moves to stable points); recover with the whole sequence.
        self.resyncs += 1
        self._start = self._read = 0
        self._window_done = "".join(self._raw_parts)
        text = self._decode(self.ids)
        if not text.startswith(self._window_done):  # emitted text cannot be taken back
            text = self._window_done + text[len(self._window_done):]
        return text

    def _emit(self, raw: str) -> str:
        if not raw:
            return ""
        self._raw_parts.append(raw)
        out = self._cleanup.feed(raw) if self._cleanup is not None else raw
        if out:
            self._parts.append(out)
        return out

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it made final (possibly ``""``)."""
        if self.finished:
            raise RuntimeError("push() after flush(): start a new IncrementalDetokenizer")
        self.ids.append(int(token_id))
        text = self._window_text()
        done = len(self._window_done)
        stable = max(self._stable_length(text), done)
        raw = text[done:stable]
        if stable == len(text):
            # All final: the window moves to the tokens emitted at the previous move, so that it keeps
            # some context (SentencePiece drops the space of the first word of a decode) - unless they
            # decode to nothing (lone "▁", control ids), in which case it stays where it is.
            nxt = self._decode(self.ids[self._read:]) if self._read > self._start else ""
            if nxt:
                self._start, self._window_done = self._read, nxt
            else:
                self._window_done = text
            self._read = len(self.ids)
        else:
            self._window_done = text[:stable]
        return self._emit(raw)

    def extend(self, token_ids: Iterable[int]) -> str:
        """``push`` each id; return the concatenated deltas."""
        return "".join([self.push(t) for t in token_ids])

    def flush(self) -> str:
        """End of the sequence: return all text still held back. Call once."""
        if self.finished:
            return ""
        self.finished = True
        out = ""
        if self.ids:
            text = self._window_text()
            out = self._emit(text[len(self._window_done):])
        if self._cleanup is not None:
            tail = self._cleanup.flush()
            if tail:
                self._parts.append(tail)
            out += tail
        return out


# ----------------------------------------------------------------------------- stop strings
class StopStringMatcher:
    """Cuts a text stream before the first stop string.

    ``feed(delta)`` returns the text that is certainly before any stop string: a tail that is a proper
    prefix of a stop string is held back until it completes (then ``stopped`` becomes True, ``stop_string``
    names it and only the text before it was ever returned) or cannot complete any more (then it is
    released). The stream stops as soon as the text *contains* a stop string: when several could match,
    the one that is complete first in the text wins (on a tie, the longer one), so the result does not
    depend on how the text was chunked. Once stopped, ``feed`` returns ``""``; ``flush`` releases the held
    tail at the end of an unstopped stream.
    """

    def __init__(self, stop: str | Iterable[str]) -> None:
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
        self.stops = tuple(dict.fromkeys(stops))
        self._prefixes, self._max = _proper_prefixes(self.stops)
        self._held = ""
        self.stopped = False
        self.stop_string: str | None = None

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._held + text
        if not buf or not self.stops:
            self._held = ""
            return buf
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for stop in self.stops:
            found = buf.find(stop)
            if found >= 0:
                key = (found + len(stop), -len(stop), stop)
                best = key if best is None or key < best else best
        if best is not None:
            end, neg_len, stop = best
            self.stopped, self.stop_string, self._held = True, stop, ""
            return buf[: end + neg_len]
        keep = _longest_held_suffix(buf, self._prefixes, self._max)
        self._held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


# ----------------------------------------------------------------------------- ChatGLM post-processing
def _is_cjk(char: str | None) -> bool:
    return char is not None and _CJK_FIRST <= char <= _CJK_LAST


def postprocess_chatglm(text: str) -> str:
    """ChatGLM-6B's ``process_response`` (spec A7), one shot.

    ``strip()``; ``[[训练时间]]`` -> ``2023年``; then for each of ``, ! : ; ?`` in turn, an ASCII mark right
    after a CJK ideograph (U+4E00..U+9FFF), then one right before one, becomes the full-width mark.
    """
    text = text.strip().replace(*CHATGLM_TRAINING_TIME)
    for ascii_mark, full_width in CHATGLM_PUNCTUATION:
        mark = re.escape(ascii_mark)  # the reference writes "\\?" by hand; the others need no escape
        text = re.sub(r"([\u4e00-\u9fff])" + mark, r"\1" + full_width, text)
        text = re.sub(mark + r"([\u4e00-\u9fff])", full_width + r"\1", text)
    return text


class _StripStage:
    """Streaming ``str.strip()``: leading whitespace dropped, trailing whitespace held until more text."""

    def __init__(self) -> None:
        self._started = False
        self._spaces = ""

    def feed(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        buf = self._spaces + text
        body = buf.rstrip()
        self._spaces = buf[len(body):]
        return body

    def flush(self) -> str:
        self._spaces = ""
        return ""


class _PunctuationStage:
    """Streaming full-width conversion: an ASCII mark becomes full width when a neighbour is CJK.

    The reference's ten ``re.sub`` calls amount to a per-character rule (a converted mark is never CJK, so
    one conversion cannot enable or block another), which needs the next character: a mark whose previous
    character is not CJK is held until the next one arrives (or the stream ends).
    """

    _MAP = dict(CHATGLM_PUNCTUATION)
    _ANY = re.compile(f"[{re.escape(''.join(_MAP))}]")

    def __init__(self) -> None:
        self._prev: str | None = None  # last character before the current input (held mark excluded)
        self._held = ""

    def feed(self, text: str) -> str:
        buf = self._held + text
        if not buf:
            return ""
        self._held = ""
        if not self._ANY.search(buf):
            self._prev = buf[-1]
            return buf
        out = []
        last = len(buf) - 1
        for i, char in enumerate(buf):
            full = self._MAP.get(char)
            if full is None:
                out.append(char)
                continue
            prev = buf[i - 1] if i else self._prev
            if _is_cjk(prev):
                out.append(full)
            elif i < last:
                out.append(full if _is_cjk(buf[i + 1]) else char)
            else:
                self._held = char
        self._prev = buf[-2] if self._held and len(buf) > 1 else (self._prev if self._held else buf[-1])
        return "".join(out)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class StreamPostprocessor(StagePipeline):
    """A response post-processing applied to a stream of text deltas (feed deltas, get deltas).

    :func:`chatglm_postprocessor` builds ChatGLM-6B's: the outputs concatenate to
    ``postprocess_chatglm(whole_text)``, whatever the chunking. Text may be held back (trailing
    whitespace, a partial ``[[训练时间]]``, an ASCII mark whose next character is not known yet) but
    nothing is ever taken back.
    """


def glm4_postprocessor() -> StreamPostprocessor:
    """Streaming GLM-4 ``process_response`` for plain answers: strip and ``[[训练时间]]`` (no punctuation rule)."""
    return StreamPostprocessor([_StripStage(), StreamReplace(*CHATGLM_TRAINING_TIME)])


def chatglm_postprocessor() -> StreamPostprocessor:
    """Streaming :func:`postprocess_chatglm` (strip, ``[[训练时间]]``, full-width punctuation)."""
    return StreamPostprocessor([_StripStage(), StreamReplace(*CHATGLM_TRAINING_TIME), _PunctuationStage()])


# The answer post-processing styles, named after what they do (``FamilySpec.postprocess`` holds one):
# "strip" strips the answer and fills in ``[[训练时间]]``; "full-width" also turns ASCII punctuation next to a
# CJK ideograph full width.
POSTPROCESS_STYLES: dict[str, Callable[[], StreamPostprocessor]] = {
    "strip": glm4_postprocessor,
    "full-width": chatglm_postprocessor,
}


def postprocessor(style: str) -> StreamPostprocessor:
    """A fresh streaming post-processor of ``style`` (one of :data:`POSTPROCESS_STYLES`); ValueError otherwise."""
    try:
        return POSTPROCESS_STYLES[style]()
    except KeyError:
        known = ", ".join(map(repr, POSTPROCESS_STYLES))
        raise ValueError(f"unknown postprocess {style!r} (known: {known})") from None


# ----------------------------------------------------------------------------- all together
class DecodeStream:
    """ids -> :class:`IncrementalDetokenizer` -> :class:`StopStringMatcher` -> post-processing.

    ``push(token_id)`` returns the new text to show; ``flush()`` the rest at the end. The outputs
    concatenate to ``postprocess(text_before_first_stop(tokenizer.decode(ids)))``. After a stop string
    (``stopped``), ``push`` returns ``""``: the caller should stop generating.
    ``postprocess``: None, a style of :data:`POSTPROCESS_STYLES` or a :class:`TextStage` (e.g.
    :class:`StreamPostprocessor`).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        stop: str | Iterable[str] = (),
        postprocess: str | TextStage | None = None,
        **detokenizer_options: Any,
    ) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, **detokenizer_options)
        self.matcher = StopStringMatcher(stop)
        if isinstance(postprocess, str):
            postprocess = postprocessor(postprocess)
        self.postprocessor: TextStage | None = postprocess
        self._parts: list[str] = []
        self._closed = False

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    @property
    def stop_string(self) -> str | None:
        return self.matcher.stop_string

    @property
    def text(self) -> str:
        """All text returned so far."""
        return "".join(self._parts)

    def _out(self, text: str, end: bool) -> str:
        if self._closed:
            return ""
        if self.postprocessor is not None:
            text = self.postprocessor.feed(text) if text else ""
            if end:
                text += self.postprocessor.flush()
        self._closed = end
        if text:
            self._parts.append(text)
        return text

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        text = self.matcher.feed(self.detokenizer.push(token_id))
        return self._out(text, end=self.stopped)

    def flush(self) -> str:
        if self._closed:
            return ""
        text = "" if self.stopped else self.matcher.feed(self.detokenizer.flush())
        text += self.matcher.flush()
        return self._out(text, end=True)
