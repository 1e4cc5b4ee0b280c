"""Parsing a request body with bounded cost, off the event loop and without holding the GIL for long.

Called in a worker thread (never on the event loop). Two things make a plain ``json.loads`` unsafe for an
untrusted body of tens of MiB:

* **element count**: ``[[],[],...]`` of 32 MiB is ~11 million containers, seconds of parsing and ~1 GiB of
  Python objects. Before parsing, the structural bytes ``,`` ``[`` ``{`` are counted (with numpy, which
  releases the GIL); every JSON value but the first of a container follows a comma or opens one, so their
  count bounds the number of values. The same bytes inside strings count too: the bound is conservative.
* **long C calls**: ``json.loads`` holds the GIL from start to end, so a 32 MiB body stalls every other
  thread, the event loop included, for ~100 ms. Long strings without escapes (base64 image payloads) are
  cut out of the body before parsing and restored afterwards, decoded in slices; only the small skeleton
  goes through ``json.loads``.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import numpy as np

from visualglm.serving.protocol import APIError

LONG_STRING = 64 * 1024  # bytes: strings at least this long are lifted out before parsing
_SLICE = 1 << 20  # bytes decoded per C call (each ~1 ms; the GIL can change hands between them)
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_STRUCTURAL = np.zeros(256, dtype=bool)
_STRUCTURAL[[ord(","), ord("["), ord("{")]] = True


def parse_json_body(body: bytes, max_values: int) -> Any:
    """``body`` parsed as JSON; raises :class:`APIError` 400 for invalid JSON and 413 for a body with more
    than ``max_values`` JSON values (counted conservatively, see the module docstring)."""
    raw = np.frombuffer(body, dtype=np.uint8)
    if count_values(body) > max_values:
        raise APIError(413, f"the body holds more than {max_values} JSON values (commas and brackets "
                       "counted)", code="request_too_complex")
    try:
        if len(body) < 2 * LONG_STRING:
            return json.loads(body)
        skeleton, lifted, marker = _lift_long_strings(body, raw, max_values)
        parsed = json.loads(skeleton)
        return _restore(parsed, lifted, marker) if lifted else parsed
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, "the body is not valid JSON", code="invalid_json") from None


def count_values(body: bytes) -> int:
    """An upper bound on the number of JSON values in ``body``: its commas and opening brackets, plus one
    (numpy does the counting, with the GIL released)."""
    return int(np.count_nonzero(_STRUCTURAL[np.frombuffer(body, dtype=np.uint8)])) + 1


def _lift_long_strings(body: bytes, raw: np.ndarray, max_values: int) -> tuple[bytes, list[str], str]:
    """``body`` with each long string literal that has no escape replaced by a short marker string, the
    lifted strings, and the marker prefix (random per body, so client text can never collide with it).

    Strings are found from the positions of the quote bytes alone: outside a string the next quote opens
    one; inside, the next quote not preceded by an odd run of backslashes closes it. Anything malformed is
    left in place for ``json.loads`` to refuse."""
    quotes = np.flatnonzero(raw == _QUOTE)
    if len(quotes) > 4 * max_values:  # each value has at most two unescaped quotes; text adds a few more
        raise APIError(413, f"the body holds more than {max_values} JSON values (quotes counted)",
                       code="request_too_complex")
    marker = "\x00" + secrets.token_hex(8) + "#"
    parts: list[bytes] = []
    lifted: list[str] = []
    done = 0  # bytes of body copied to parts so far
    i, count = 0, len(quotes)
    while i < count:
        start = int(quotes[i])
        j = i + 1
        while j < count and _escaped(body, int(quotes[j])):
            j += 1
        if j == count:
            break  # an unterminated string: json.loads reports it
        end = int(quotes[j])
        if end - start - 1 >= LONG_STRING and body.find(b"\\", start, end) < 0:
            content = _decode_slices(body, start + 1, end)
            if content is not None:
                parts += (body[done:start], json.dumps(marker + str(len(lifted))).encode())
                lifted.append(content)
                done = end + 1
        i = j + 1
    parts.append(body[done:])
    return b"".join(parts), lifted, marker


def _escaped(body: bytes, quote: int) -> bool:
    """Whether the quote at index ``quote`` follows an odd number of backslashes."""
    k = quote - 1
    while k >= 0 and body[k] == _BACKSLASH:
        k -= 1
    return (quote - 1 - k) % 2 == 1


def _decode_slices(body: bytes, start: int, end: int) -> str | None:
    """``body[start:end]`` as a str, decoded in slices; None (leave it to json.loads, which refuses it) when
    it holds a control character or invalid UTF-8."""
    view = np.frombuffer(body, dtype=np.uint8, count=end - start, offset=start)
    if bool((view < 0x20).any()):
        return None
    pieces = []
    position = start
    try:
        while position < end:
            stop = min(end, position + _SLICE)
            while stop < end and 0x80 <= body[stop] < 0xC0:  # never cut a UTF-8 sequence in two
                stop -= 1
            pieces.append(body[position:stop].decode("utf-8"))
            position = stop
    except UnicodeDecodeError:
        return None
    return "".join(pieces)


def _restore(parsed: Any, lifted: list[str], marker: str) -> Any:
    """Put the lifted strings back in place of their markers (iterative: nesting depth is the client's)."""

    def swap(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(marker):
            return lifted[int(value[len(marker):])]
        return value

    parsed = swap(parsed)
    stack = [parsed]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in list(items):
            if isinstance(value, (dict, list)):
                stack.append(value)
            else:
                node[key] = swap(value)
    return parsed
