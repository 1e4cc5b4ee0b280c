"""``visualglm chat``: interactive chat with typewriter streaming.

With a VisualGLM-6B model the chat first asks for an image path or URL (Enter: text-only chat), unless
``--image`` gave one. Commands at the prompt: ``clear`` starts over (VisualGLM: with a new image), ``image
PATH_OR_URL`` switches to another image in a fresh conversation, ``stop`` (or Ctrl-D) leaves. Ctrl-C while
an answer is being written interrupts that answer only; at the prompt it discards the line.
"""

from __future__ import annotations

import argparse
import sys

from visualglm.cli.options import (
    add_generation_flags,
    add_image_flags,
    add_model_flags,
    add_parallel_flags,
    build_session,
    relaunch_for_tp,
    set_session_image,
    terminal_safe,
)

WELCOME = "VisualGLM chat. Type your message; 'clear' starts over, 'image PATH' sets an image, 'stop' exits."
CTRL_C_HINT = "(type 'stop' or press Ctrl-D to leave)"
IMAGE_PROMPT = "\n请输入图像路径或URL（回车进入纯文本对话）/ image path or URL (Enter: text only): "


class _Leave(Exception):
    """The user asked to leave (stop, Ctrl-D)."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("chat", help="chat interactively", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    add_image_flags(parser)
    add_generation_flags(parser)
    add_parallel_flags(parser)
    parser.set_defaults(run=run)


def _read(prompt: str) -> str:
    """One line of input; Ctrl-C drops the line (returns ""), Ctrl-D / 'stop' leaves. Under tensor
    parallelism rank 0 reads and every rank gets the line (or leaves), so all follow the same chat."""
    from visualglm.distributed.launch import rank0_call

    return rank0_call(_read_line, prompt)


def _read_line(prompt: str) -> str:
    try:
        line = input(prompt)
    except EOFError:
        print()
        raise _Leave from None
    except KeyboardInterrupt:
        print(f"\n{CTRL_C_HINT}")
        return ""
    if line.strip() == "stop":
        raise _Leave
    return line


def _choose_image(session) -> None:
    """Ask until the user gives a loadable image or presses Enter for text only."""
    while True:
        source = _read(IMAGE_PROMPT).strip()
        if not source:
            return
        try:
            set_session_image(session, source)
            return
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)


def speaker(session) -> str:
    """The answer label of ``session``'s model family (``FamilySpec.chat_label``), as the reference demos print
    it (VisualGLM-6B's cli_demo: "VisualGLM-6B："; ASCII colon here, like the "用户: " prompt)."""
    return session.spec.chat_label


def _answer(session, query: str) -> None:
    print(f"\n{speaker(session)}: ", end="", flush=True)
    stream = session.stream(query)
    try:
        for delta in stream:
            print(terminal_safe(delta), end="", flush=True)
    except KeyboardInterrupt:
        stream.close()
        print(" [interrupted]", end="")
    except ValueError as exc:  # e.g. the history no longer fits the context
        stream.close()
        if session.history and session.history[-1][0] == query:
            session.history.pop()
        print(f"\nerror: {exc}", file=sys.stderr)
    print(flush=True)


def _turn(session, query: str) -> None:
    """Act on one line typed at the prompt: a command or a question."""
    command = query.strip()
    if not command:
        return
    if command == "clear":
        if session.multimodal:
            session.reset()
            _choose_image(session)
        else:
            session.clear_history()
        print(WELCOME)
    elif command.startswith("image "):
        try:
            set_session_image(session, command[len("image "):].strip())
            session.clear_history()
            print("(image loaded; new conversation)")
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
    else:
        _answer(session, query)


def run(args: argparse.Namespace) -> int:
    if (status := relaunch_for_tp(args)) is not None:
        return status
    session = build_session(args)
    print(WELCOME)
    try:
        if session.multimodal and not args.image:
            _choose_image(session)
        while True:
            try:
                _turn(session, _read("\n用户: "))
            except KeyboardInterrupt:  # a Ctrl-C that lands after an answer ends, before the prompt reads
                print(f"\n{CTRL_C_HINT}")
    except _Leave:
        return 0
