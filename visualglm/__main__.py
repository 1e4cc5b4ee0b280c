"""``python -m visualglm`` = the ``visualglm`` command (under torchrun too: each rank runs it)."""

from visualglm.cli.main import entry

entry()
