"""``visualglm ask``: one question, one answer on stdout (logs on stderr). Reads stdin without a question."""

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
    terminal_safe,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    for name in ("ask", "generate"):
        parser = commands.add_parser(name, help="answer one question (non-interactive)" if name == "ask"
                                     else "alias of ask", description=__doc__)
        parser.add_argument("question", nargs="?", help="the question (default: read stdin)")
        add_model_flags(parser)
        add_image_flags(parser)
        add_generation_flags(parser)
        add_parallel_flags(parser)
        parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if (status := relaunch_for_tp(args)) is not None:
        return status
    from visualglm.distributed.launch import init_from_env, rank0_call

    init_from_env(args.device)  # under torchrun: rank 0 alone reads stdin, the others receive the question
    question = args.question if args.question is not None else rank0_call(sys.stdin.read)
    if not question.strip():
        raise ValueError("empty question (pass it as an argument or on stdin)")
    session = build_session(args)
    to_terminal = sys.stdout.isatty()
    for delta in session.stream(question):
        sys.stdout.write(terminal_safe(delta) if to_terminal else delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
