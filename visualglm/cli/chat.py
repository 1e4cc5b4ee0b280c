"""``visualglm chat``: interactive chat with typewriter streaming.

Commands at the prompt: ``clear`` forgets the conversation (the image stays), ``image PATH_OR_URL``
talks about a new image (VisualGLM-6B) from a fresh conversation, ``stop`` (or Ctrl-D) leaves. Ctrl-C while an
answer is being written interrupts that answer only; at the prompt it discards the line.
"""

from __future__ import annotations

import argparse
import sys

from visualglm.cli.options import (
    add_generation_flags,
    add_image_flags,
    add_model_flags,
    build_session,
    terminal_safe,
)

WELCOME = "VisualGLM chat. Type your message; 'clear' clears the history, 'image PATH' sets an image, 'stop' exits."


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("chat", help="chat interactively", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    add_image_flags(parser)
    add_generation_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    session = build_session(args)
    print(WELCOME)
    while True:
        try:
            query = input("\n用户: ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # like a shell: drop the line, stay in the chat
            print("\n(type 'stop' or press Ctrl-D to leave)")
            continue
        command = query.strip()
        if command == "stop":
            return 0
        if command == "clear":
            session.clear_history()
            print(WELCOME)
            continue
        if command.startswith("image "):
            try:
                session.clear_history()
                session.set_image(command[len("image "):].strip(), allow_remote=True)
                print("(image loaded; new conversation)")
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
            continue
        if not command:
            continue
        print("\nChatGLM: ", end="", flush=True)
        stream = session.stream(query)
        try:
            for delta in stream:
                print(terminal_safe(delta), end="", flush=True)
        except KeyboardInterrupt:
            stream.close()
            print(" [interrupted]", end="")
        except ValueError as exc:  # e.g. the history no longer fits the context
            stream.close()
            session.history.pop() if session.history and session.history[-1][0] == query else None
            print(f"\nerror: {exc}", file=sys.stderr)
        print(flush=True)
