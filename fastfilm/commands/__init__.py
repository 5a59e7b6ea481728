"""The subcommands of `fastfilm`: each module has a `run(cfg) -> exit code` (fastfilm/cli.py)."""
