"""Printing helpers of the CLI: JSON, tables, progress bars, sizes."""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def emit_json(value: Any) -> None:
    """Print a JSON document on stdout."""
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def table(rows: list[list[str]], header: list[str]) -> None:
    """Print aligned columns on stdout."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def human_size(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


class ProgressBar:
    """A one-line progress bar on stderr, shown only on a terminal and only for large transfers."""

    THRESHOLD = 4 * 1024 * 1024

    def __init__(self, label: str) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty()
        self._started = time.monotonic()
        self._last = 0.0
        self._shown = False

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled or (total or done) < self.THRESHOLD:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and (total is None or done < total):
            return
        self._last = now
        rate = done / max(now - self._started, 1e-6)
        if total:
            filled = int(30 * done / total)
            bar = "#" * filled + "-" * (30 - filled)
            amounts = f"{human_size(done)}/{human_size(total)} {human_size(rate)}/s"
            text = f"\r{self.label} [{bar}] {100 * done // total:3d}% {amounts}"
        else:
            text = f"\r{self.label} {human_size(done)} {human_size(rate)}/s"
        sys.stderr.write(text)
        sys.stderr.flush()
        self._shown = True

    def note(self, text: str) -> None:
        """Print `text` on a line of its own (a terminal or not); the bar goes on below it."""
        if self._shown:
            sys.stderr.write("\n")
            self._shown = False
        sys.stderr.write(f"cyberdesk: {text}\n")
        sys.stderr.flush()

    def finish(self) -> None:
        """End the bar's line."""
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
