"""Entry point of the ``visualglm`` command. Each subcommand parses flags and calls one library function.

Errors the user can fix (bad paths, bad checkpoints, bad flags) are printed as one line on stderr with
exit status 2; no traceback unless ``VISUALGLM_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from visualglm import __version__
from visualglm.cli import ask, batch, bench, chat, convert, demo, finetune, info, merge_lora, serve, web
from visualglm.cli import eval as eval_command
from visualglm.cli import quantize as quantize_command
from visualglm.distributed.launch import exit_process

SUBCOMMANDS = (demo, chat, ask, batch, eval_command, info, convert, quantize_command, bench, finetune, merge_lora,
               serve, web)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visualglm", description="Run ChatGLM-6B / VisualGLM-6B / GLM-4V-9B "
                                     "locally in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"visualglm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        if os.environ.get("VISUALGLM_DEBUG"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"visualglm {args.command}: error: {message}", file=sys.stderr)
        return 2


def entry() -> NoReturn:
    """The ``visualglm`` command and ``python -m visualglm``: ``main`` with the process's exit handled (a
    torchrun rank leaves its process group together with the others, ``distributed.launch.exit_process``)."""
    exit_process(main())
