"""``visualglm info MODEL``: what a checkpoint directory holds (family, sizes, files) without loading it."""

from __future__ import annotations

import argparse

from visualglm.checkpoint.inspect import describe_checkpoint


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("info", help="describe a checkpoint directory without loading it",
                                 description="Print the model family, configuration and weight files of a "
                                 "checkpoint directory (official HF layout) without loading the weights.")
    parser.add_argument("model", help="checkpoint directory (or a known name / hub id)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(describe_checkpoint(args.model))
    return 0
