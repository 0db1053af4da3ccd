"""The command line: `autopart plan` and `autopart report` (commands.py)."""

from autopart.cli.commands import main

__all__ = ["main"]
