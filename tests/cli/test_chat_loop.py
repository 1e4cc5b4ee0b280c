"""The chat loop in-process, with a stand-in session: where a Ctrl-C may land."""

from __future__ import annotations

import argparse
import builtins

import pytest

from visualglm.cli import chat


class _Session:
    """Answers every question with "answer to <question>"."""

    multimodal = False

    def __init__(self) -> None:
        self.history: list[tuple[str, str]] = []
        self.spec = argparse.Namespace(chat_label="ChatGLM")

    def stream(self, query: str):
        yield f"answer to {query}"
        self.history.append((query, f"answer to {query}"))


def _run_chat(monkeypatch: pytest.MonkeyPatch, lines: list[str], print_hook) -> tuple[int, list[str]]:
    session, shown = _Session(), []
    monkeypatch.setattr(chat, "relaunch_for_tp", lambda args: None)
    monkeypatch.setattr(chat, "build_session", lambda args: session)
    lines = iter(lines)

    def fake_input(prompt: str) -> str:
        shown.append(prompt)
        return next(lines)

    def fake_print(*parts, **kwargs) -> None:
        print_hook(parts, kwargs)
        shown.append(kwargs.get("sep", " ").join(map(str, parts)) + kwargs.get("end", "\n"))

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(chat, "print", fake_print, raising=False)
    try:
        status = chat.run(argparse.Namespace(image=None))
    except KeyboardInterrupt:  # escaping run() ends the chat (the CLI prints "interrupted" and exits 130)
        pytest.fail(f"the Ctrl-C ended the chat: {''.join(shown)!r}")
    return status, shown + [repr(session.history)]


def test_a_ctrl_c_landing_just_after_an_answer_ends_keeps_the_chat(monkeypatch: pytest.MonkeyPatch) -> None:
    # The answer's closing newline is the last thing _answer prints: a Ctrl-C there is past the answer's own
    # handler. It used to end the whole chat ("interrupted", exit 130).
    pressed = []

    def ctrl_c_on_first_closing_newline(parts, kwargs) -> None:
        if not parts and kwargs.get("flush") and not pressed:
            pressed.append(True)
            raise KeyboardInterrupt

    status, shown = _run_chat(monkeypatch, ["one", "two", "stop"], ctrl_c_on_first_closing_newline)
    text = "".join(shown)
    assert status == 0 and pressed
    assert chat.CTRL_C_HINT in text and "answer to two" in text, text
    assert text.index("answer to one") < text.index(chat.CTRL_C_HINT) < text.index("answer to two")


def test_a_ctrl_c_during_an_answer_marks_it_interrupted(monkeypatch: pytest.MonkeyPatch) -> None:
    pressed = []

    def ctrl_c_on_first_delta(parts, kwargs) -> None:
        if parts and str(parts[0]).startswith("answer to") and not pressed:
            pressed.append(True)
            raise KeyboardInterrupt

    status, shown = _run_chat(monkeypatch, ["one", "two", "stop"], ctrl_c_on_first_delta)
    text = "".join(shown)
    assert status == 0 and " [interrupted]" in text and "answer to two" in text, text
    assert chat.CTRL_C_HINT not in text
