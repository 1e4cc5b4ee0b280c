"""What one request and one client may cost the server: every limit in one frozen dataclass.

Standard library only, so the command line can build its flags from it without the serving extras.
"""

from __future__ import annotations

from dataclasses import dataclass

# With no --prefill-chunk, a step carrying a prompt's prefill beside the other rows may cost this many times
# a lone row's decode step, as measured at start-up (visualglm.generation.step_costs): under 2 so that the
# time between tokens stays within twice the unloaded step with the noise of a busy machine on top.
STEP_RATIO = 1.75
# A prompt of up to this many new tokens (a chat turn with its template), or twice the prefill chunk if that is
# more, is prefilled in one step, ahead of a long prompt in progress: its first token comes at once, whatever
# chunk the machine allows the long prompts. Such steps are few beside a long prompt's many.
SHORT_PROMPT_TOKENS = 32


@dataclass(frozen=True)
class ServeLimits:
    """What one request and one connection may cost. Each limit breached is a 4xx JSON error (408, 413,
    400) or a closed connection, never a crash, an OOM or a stalled server. Every field is a ``serve``
    option (``--max-body-bytes`` for ``max_body_bytes``, ...)."""

    # -- a request's content
    max_body_bytes: int = 32 * 2**20  # whole request body; base64 of a 20 MiB image is ~27 MiB
    max_json_values: int = 100_000  # JSON values in a body (commas and brackets counted, also in strings)
    max_image_bytes: int = 20 * 2**20  # decoded image file
    max_image_pixels: int = 25_000_000  # decoded width * height (decompression bombs)
    max_image_side: int = 10_000  # pixels, either side (a 1 x 25,000,000 strip costs far more than its pixels)
    max_image_aspect: float = 20.0  # longer side / shorter side
    max_text_chars: int = 32_000  # all message / history text of one request, added up
    max_history_turns: int = 64  # earlier (query, response) pairs, or OpenAI user/assistant pairs
    max_prompt_tokens: int | None = None  # None: the model's context minus one answer token
    max_new_tokens: int = 1024  # answer tokens per request (OpenAI max_tokens may not exceed it)
    max_stop_strings: int = 4  # as OpenAI
    max_stop_chars: int = 64
    # -- the server's shared resources
    max_queue: int = 16  # requests waiting for the worker; more get 503 + Retry-After
    max_batch: int = 8  # rows generated together (1: one at a time)
    kv_cache_gib: float | None = None  # KV cache of the rows (None: half the memory free at start-up)
    prefill_chunk: int | None = None  # prompt tokens of prefill a step carries beside running rows (None: measured)
    request_threads: int = 2  # bodies parsed and images decoded at once (the rest wait their turn)
    max_large_bodies: int = 4  # bodies over 1 MiB being received or held at once (the rest wait)
    retry_after_s: int = 2  # the Retry-After hint sent with 503
    # -- connections
    max_connections: int = 100  # open connections; at the cap the oldest idle one is closed for a new one
    header_timeout_s: float = 10.0  # from connecting (or the previous response) to a complete request head
    body_timeout_s: float = 30.0  # to receive a body, plus 1 s per min_body_rate bytes received
    min_body_rate: int = 64 * 1024  # bytes per second a body must average beyond body_timeout_s
    keep_alive_s: float = 5.0  # an idle connection between requests is closed after this

    def prompt_limit(self, context: int) -> int:
        """Prompt tokens allowed for a model with ``context`` positions."""
        room = max(1, context - 1)
        return room if self.max_prompt_tokens is None else min(self.max_prompt_tokens, room)
