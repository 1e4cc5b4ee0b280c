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


def visualglm_prompt(query: str, history: Sequence[tuple[str, str]] = (), english: bool = False) -> str:
    """VisualGLM-6B's text template (no ``[Round i]`` markers): ``问：q\\n答：r\\n`` per turn then
    ``问：query\\n答：``; in English mode ``Q:q\\nA:r\\n`` ... ``Q:query\\nA:`` (no space after the colon)."""
    ask, answer = ("Q:", "A:") if english else ("问：", "答：")
    turns = "".join(f"{ask}{q}\n{answer}{r}\n" for q, r in history)
    return f"{turns}{ask}{query}\n{answer}"


def visualglm_ids(tokenizer, query: str, history: Sequence[tuple[str, str]] = (), *, image_length: int | None,
                  english: bool = False) -> tuple[list[int], int | None]:
    """Prompt ids of VisualGLM-6B's HF ``chat`` and where the image placeholders start (None: no image).

    With an image: ``encode("<img>")`` + ``image_length`` placeholder ids (``<unk>``, as the HF code) +
    ``encode("</img>" + text)``, each part encoded separately (each gets its own dummy prefix), then
    ``[gMASK] <sop>``. ``<img>``/``</img>`` are plain text, not special tokens.
    """
    text = visualglm_prompt(query, history, english)
    if image_length is None:
        return tokenizer.encode(text), None
    before = tokenizer.encode("<img>", add_special_tokens=False)
    after = tokenizer.encode("</img>" + text, add_special_tokens=False)
    ids = before + [tokenizer.unk_token_id] * image_length + after
    return tokenizer.build_inputs_with_special_tokens(ids), len(before)


def glm4_messages(query: str, history: Sequence[tuple[str, str]], *, image: bool) -> list[dict]:
    """``history`` pairs + ``query`` in GLM-4's message format; ``image`` marks the first user message as
    carrying the conversation's image."""
    messages: list[dict] = []
    for q, r in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    messages.append({"role": "user", "content": query})
    if image:
        messages[0]["image"] = True
    return messages


def has_cjk(text: str) -> bool:
    """True when ``text`` holds a CJK unified ideograph (U+4E00..U+9FFF), the reference demos' test."""
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)
