"""Subcommands of the `cake` CLI, one module each."""
