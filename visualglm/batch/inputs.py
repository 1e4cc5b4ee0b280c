"""The rows of a batch job: a JSONL file or a folder of images, checked before anything runs.

A JSONL row is an object ``{"id", "image"?, "prompt" | "messages", sampling fields?}``:

* ``id`` (string or integer, required, unique in the file) names the row in the output;
* ``prompt`` is one question; ``messages`` a conversation ``[{"role": "user" | "assistant", "content": str},
  ...]`` that alternates, starts and ends with the user (earlier turns become the history);
* ``image`` is a file path (relative to the JSONL file's folder), a ``data:image/...;base64,`` URL, or an
  http(s) URL (only with ``allow_remote``);
* sampling fields (:data:`ROW_SAMPLING_FIELDS`) override the job's settings for that row, and ``stop`` is a
  list of stop strings. Other fields (labels, metadata) are ignored.

:func:`scan` reads the whole file first: a line that is not a JSON object, a row without a usable ``id`` or a
duplicate ``id`` is an :class:`InputError` naming the line, before the model is even loaded (the output
could not say which row it belongs to). Anything else wrong with a row (no prompt, bad messages, a bad
sampling value) is that row's own error, recorded in the output: :func:`parse_row` never raises for it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Row fields that override the job's sampling settings (SamplingParams names), and the length limits.
ROW_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "do_sample", "seed")
ROW_LENGTH_FIELDS = ("max_new_tokens", "max_length")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
MAX_STOP_STRINGS = 8


class InputError(ValueError):
    """The input as a whole cannot run (unreadable, a row without an id, duplicate ids, ...)."""


@dataclass
class BatchRow:
    """One parsed row. ``error`` is set (and the rest may be empty) when the row cannot run."""

    id: Any
    key: str  # the id as canonical JSON: "7" and 7 are different ids
    query: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)
    image: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None
    max_length: int | None = None
    stop: tuple[str, ...] = ()
    error: str | None = None


def id_key(row_id: Any) -> str:
    return json.dumps(row_id, ensure_ascii=False)


def valid_id(row_id: Any) -> bool:
    return (isinstance(row_id, str) and row_id != "") or (isinstance(row_id, int) and not isinstance(row_id, bool))


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines of ``path``."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below; errors must name the file)
    except FileNotFoundError:
        raise InputError(f"input file '{path}' does not exist") from None
    except IsADirectoryError:
        raise InputError(f"input '{path}' is a folder: pass a JSONL file, or the folder with --prompt") from None
    except OSError as exc:
        raise InputError(f"cannot read input file '{path}': {exc.strerror or exc}") from None
    with handle:
        for number, data in enumerate(handle, 1):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}:{number}: not UTF-8 text") from None
            if text.strip():
                yield number, text


def parse_object(text: str, where: str) -> dict:
    """A line's JSON object, or an :class:`InputError` naming ``where``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise InputError(f"{where}: a row must be a JSON object, got {type(value).__name__}")
    row_id = value.get("id")
    if "id" not in value:
        raise InputError(f"{where}: the row has no \"id\" (every row needs a unique string or integer id)")
    if not valid_id(row_id):
        raise InputError(f"{where}: \"id\" must be a non-empty string or an integer, got {json.dumps(row_id)[:60]}")
    return value


def scan(path: str | Path) -> list[str]:
    """Check every line of the JSONL file ``path`` (JSON objects with unique ids); the rows' id keys."""
    path = Path(path)
    seen: dict[str, int] = {}
    for number, text in _lines(path):
        row = parse_object(text, f"{path}:{number}")
        key = id_key(row["id"])
        if key in seen:
            raise InputError(f"{path}:{number}: duplicate id {key[:80]} (first on line {seen[key]}): ids must be "
                             "unique, the output and resuming rely on them")
        seen[key] = number
    if not seen:
        raise InputError(f"input file '{path}' has no rows")
    return list(seen)


def read_rows(path: str | Path, default_prompt: str | None = None) -> Iterator[BatchRow]:
    """The rows of the JSONL file ``path`` (checked by :func:`scan` first), parsed."""
    path = Path(path)
    for number, text in _lines(path):
        yield parse_row(parse_object(text, f"{path}:{number}"), default_prompt)


def folder_rows(folder: str | Path, prompt: str) -> list[dict]:
    """One row per image file under ``folder`` (recursively, sorted): id and image are its relative path."""
    folder = Path(folder)
    if not prompt or not prompt.strip():
        raise InputError("a folder of images needs --prompt (the question asked about every image)")
    images = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise InputError(f"folder '{folder}' holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [{"id": name, "image": name, "prompt": prompt} for name in images]


def parse_row(value: dict, default_prompt: str | None = None) -> BatchRow:
    """``value`` (a JSON object with a valid id) as a :class:`BatchRow`; its problems go to ``row.error``."""
    row = BatchRow(value["id"], id_key(value["id"]))
    try:
        _fill(row, value, default_prompt)
    except ValueError as exc:
        row.error = str(exc)
    return row


def _fill(row: BatchRow, value: dict, default_prompt: str | None) -> None:
    prompt, messages = value.get("prompt"), value.get("messages")
    if prompt is not None and messages is not None:
        raise ValueError("give either \"prompt\" or \"messages\", not both")
    if messages is not None:
        row.query, row.history = _conversation(messages)
    else:
        if prompt is None:
            prompt = default_prompt
        if prompt is None:
            raise ValueError("the row has no \"prompt\" (or \"messages\")")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("\"prompt\" must be a non-empty string")
        row.query = prompt
    image = value.get("image")
    if image is not None:
        if not isinstance(image, str) or not image.strip():
            raise ValueError("\"image\" must be a file path, a data: URL or an http(s) URL (a non-empty string)")
        row.image = image
    for name in ROW_SAMPLING_FIELDS:
        if value.get(name) is not None:
            row.sampling[name] = _sampling_value(name, value[name])
    for name in ROW_LENGTH_FIELDS:
        limit = value.get(name)
        if limit is not None:
            if not _is_int(limit) or limit < 1:
                raise ValueError(f"\"{name}\" must be a positive integer, got {json.dumps(limit)[:40]}")
            setattr(row, name, limit)
    stop = value.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
                or not all(isinstance(s, str) and s for s in stop)):
            raise ValueError(f"\"stop\" must be a non-empty string or a list of at most {MAX_STOP_STRINGS}")
        row.stop = tuple(stop)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sampling_value(name: str, value: Any) -> Any:
    """Type checks here (JSON has no int/float distinction to rely on); ranges are SamplingParams'."""
    if name == "do_sample":
        if not isinstance(value, bool):
            raise ValueError(f"\"do_sample\" must be true or false, got {json.dumps(value)[:40]}")
    elif name in ("top_k", "seed"):
        if not _is_int(value):
            raise ValueError(f"\"{name}\" must be an integer, got {json.dumps(value)[:40]}")
    elif not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"\"{name}\" must be a number, got {json.dumps(value)[:40]}")
    return value


def _conversation(messages: Any) -> tuple[str, list[tuple[str, str]]]:
    """``messages`` -> (the last user message, the (user, assistant) pairs before it)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("\"messages\" must be a non-empty list of {\"role\", \"content\"} objects")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{index}] must be an object with a string \"content\"")
        role = message.get("role")
        expected = "user" if index % 2 == 0 else "assistant"
        if role == "system":
            raise ValueError("system messages are not supported by these models' chat templates")
        if role != expected:
            raise ValueError(f"messages[{index}] has role {json.dumps(role)[:30]}, expected \"{expected}\" "
                             "(user and assistant messages alternate, starting with the user)")
        turns.append(message["content"])
    if len(turns) % 2 == 0:
        raise ValueError("the last message must be the user's (the one to answer)")
    if not turns[-1].strip():
        raise ValueError("the last user message is empty")
    history = [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]
    return turns[-1], history
