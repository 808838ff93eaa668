"""Subcommands of the ``svdq`` CLI (one module each)."""
