"""The test suite's handle on the one process launcher (`cyberdesk_stack.processes`).

ROOT is the checkout; the launcher's names are re-exported so that a test imports its process
helpers from one place.
"""

from __future__ import annotations

from pathlib import Path

from cyberdesk_stack.processes import Service, free_port, service, stop, wait_healthy

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["ROOT", "Service", "free_port", "service", "stop", "wait_healthy"]
