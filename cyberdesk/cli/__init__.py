"""The `cyberdesk` command line: `cyberdesk up`, then create, exec, shell, cp... (see `cyberdesk --help`)."""

from cyberdesk.cli._main import main

__all__ = ["main"]
