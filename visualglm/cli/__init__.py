"""The ``visualglm`` command: thin subcommands over importable functions."""
