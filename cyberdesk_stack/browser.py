"""Debian's chromium, headless, as the browser tests and bench/desktop_stream drive it (Playwright).

Playwright's Python client drives the system browser (no browser download): `make system`
installs Debian's `chromium`.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Playwright

# --no-sandbox: the suite runs as root, where chromium's own sandbox cannot start. The rest keep
# chromium from dialing Google's hosts at start (a closed network refuses them, many at a time)
# and from first-run work that only slows a throwaway profile.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def chromium_path() -> str:
    """Where Debian's chromium is; a message saying how to install it otherwise."""
    found = shutil.which("chromium") or ("/usr/bin/chromium" if shutil.which("/usr/bin/chromium") else None)
    if found is None:
        raise RuntimeError("Debian's chromium is needed for the browser tests and bench: run `make system` as root")
    return found


def launch_chromium(playwright: Playwright) -> Browser:
    """A headless Debian chromium through Playwright."""
    return playwright.chromium.launch(executable_path=chromium_path(), args=list(CHROMIUM_ARGS), headless=True)
