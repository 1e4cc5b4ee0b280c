"""Prompt templates of the reference chat functions."""

from __future__ import annotations

from collections.abc import Sequence


def chatglm_prompt(query: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """ChatGLM-6B ``chat()``: the bare query on the first turn, else ``[Round i]\\n问：q\\n答：r\\n`` per turn.

    The tokenizer then appends ``[gMASK] <sop>``.
    """
    if not history:
        return query
    prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："
