"""The ``serve`` / ``web`` flags for every :class:`~visualglm.serving.limits.ServeLimits` field, as data.

Each row: the field, its flag, its type and what it bounds; the default is the field's own. ``add_limit_flags``
adds them to a parser and ``limits_from_args`` builds the ServeLimits back, refusing values below the
minimum with a message that names the flag.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from visualglm.serving.limits import STEP_RATIO, ServeLimits


@dataclass(frozen=True)
class LimitFlag:
    field: str
    flag: str
    type: type
    help: str
    minimum: float = 1


LIMIT_FLAGS: tuple[LimitFlag, ...] = (
    LimitFlag("max_queue", "--max-queue", int, "requests allowed to wait for the model; more get 503"),
    LimitFlag("max_batch", "--max-batch", int, "rows generated together: a waiting request joins the running "
              "batch at the next step when a row is free (1 = one at a time)"),
    LimitFlag("kv_cache_gib", "--kv-cache-gib", float, "GiB of KV cache: rows of the whole context that fit it, at "
              "most --max-batch (default: half the memory free at start-up)", 0.001),
    LimitFlag("prefill_chunk", "--prefill-chunk", int, "prompt tokens' worth of prefill per step while other rows "
              "decode; a prompt of more than twice that is spread over several steps (exact). Default: measured at "
              f"start-up, the most that keeps such a step within {STEP_RATIO} decode steps of one row on this "
              "machine"),
    LimitFlag("max_new_tokens", "--max-new-tokens", int, "answer tokens one request may ask for"),
    LimitFlag("max_prompt_tokens", "--max-prompt-tokens", int, "prompt tokens one request may send "
              "(default: the model's context)"),
    LimitFlag("max_text_chars", "--max-text-chars", int, "characters of text in one request, history included"),
    LimitFlag("max_history_turns", "--max-history-turns", int, "earlier turns one request may carry"),
    LimitFlag("max_body_bytes", "--max-body-bytes", int, "bytes of one request body"),
    LimitFlag("max_json_values", "--max-json-values", int, "JSON values in one body (commas and brackets are "
              "counted before parsing, those inside strings too)"),
    LimitFlag("max_image_bytes", "--max-image-bytes", int, "bytes of one image file"),
    LimitFlag("max_image_pixels", "--max-image-pixels", int, "pixels (width x height) of one image"),
    LimitFlag("max_image_side", "--max-image-side", int, "pixels of either side of one image"),
    LimitFlag("max_image_aspect", "--max-image-aspect", float, "longer side / shorter side of one image"),
    LimitFlag("request_threads", "--request-threads", int, "threads parsing bodies and decoding images at once "
              "(more requests wait their turn; the event loop never does this work)"),
    LimitFlag("max_large_bodies", "--max-large-bodies", int, "bodies over 1 MiB received or held at once "
              "(more wait, reading nothing, until one ends)"),
    LimitFlag("max_connections", "--max-connections", int, "open connections; at the cap the longest idle one "
              "is closed for a newcomer, or the newcomer gets 503 when all are busy"),
    LimitFlag("header_timeout_s", "--header-timeout", float, "seconds a client has to send a complete request "
              "head, from connecting or from the previous response (408 and close)", 0.1),
    LimitFlag("body_timeout_s", "--body-timeout", float, "seconds a client has to send a body, plus one per "
              "--min-body-rate bytes sent (408 and close)", 0.1),
    LimitFlag("min_body_rate", "--min-body-rate", int, "bytes per second a long body must average"),
    LimitFlag("keep_alive_s", "--keep-alive", float, "seconds an idle connection stays open between requests",
              0.1),
)

_DEFAULTS = {f.name: f.default for f in fields(ServeLimits)}


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits", "what one request or one client may cost (see README, Safety)")
    for row in LIMIT_FLAGS:
        default = _DEFAULTS[row.field]
        shown = "" if default is None else f" (default: {default:g})" if isinstance(default, float) else \
            f" (default: {default})"
        group.add_argument(row.flag, dest=row.field, type=row.type, default=default, help=row.help + shown,
                           metavar="SECONDS" if row.field.endswith("_s") else "N")


def limits_from_args(args: argparse.Namespace) -> ServeLimits:
    values = {}
    for row in LIMIT_FLAGS:
        value = getattr(args, row.field)
        if value is not None and value < row.minimum:
            raise ValueError(f"{row.flag} must be at least {row.minimum:g}, got {value}")
        values[row.field] = value
    if values["max_image_aspect"] < 1:
        raise ValueError("--max-image-aspect must be at least 1")
    return ServeLimits(**values)
