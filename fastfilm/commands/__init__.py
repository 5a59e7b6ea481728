"""Subcommands: one module per command with `run(cfg) -> int`; fastfilm/cli.py derives the parser."""
