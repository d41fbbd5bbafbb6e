"""`python -m cyberdesk_stack`: the same as `cyberdesk up` with its defaults and the CYBERDESK_* variables."""

from __future__ import annotations

from cyberdesk_stack.launcher import StackOptions, run

if __name__ == "__main__":
    raise SystemExit(run(StackOptions.from_env()))
