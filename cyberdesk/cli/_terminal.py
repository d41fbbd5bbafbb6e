"""`cyberdesk shell ID`: the local terminal wired to a terminal in an instance.

The local terminal goes to raw mode, so every key (Ctrl-C included) travels as a byte to the
remote terminal, whose own line discipline turns ^C into SIGINT there. Window-size changes
(SIGWINCH) become resize messages. The terminal settings are restored whatever happens.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import termios
import threading
import tty
from typing import Any

from cyberdesk._sync.instance import Instance


def _size(fd: int) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
        return size.columns, size.lines
    except OSError:
        fallback = shutil.get_terminal_size()
        return fallback.columns, fallback.lines


def run_shell(instance: Instance, argv: list[str] | None = None) -> int:
    """Attach the local terminal to a new shell in `instance`; returns the shell's exit code."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    interactive = os.isatty(stdin)
    cols, rows = _size(stdin if interactive else stdout)
    session = instance.shell(cols=cols, rows=rows, argv=argv or None)
    ended = threading.Event()
    # Input is held back until the remote program has written something (or 3 s went by): a
    # shell that starts up flushes its terminal's input queue, so earlier keys would be lost.
    first_output = threading.Event()

    def pump_output() -> None:
        try:
            for chunk in session:
                os.write(stdout, chunk)
                first_output.set()
        except Exception as err:  # reported after the terminal is restored
            session.error = session.error or _as_error(err)
        finally:
            ended.set()

    saved: list[Any] | None = termios.tcgetattr(stdin) if interactive else None
    previous: dict[int, Any] = {}

    def on_winch(signum: int, frame: object) -> None:
        session.resize(*_size(stdin))

    def on_int(signum: int, frame: object) -> None:
        # Only reached when stdin is not a terminal (raw mode passes ^C as a byte).
        session.signal("INT")

    reader = threading.Thread(target=pump_output, name="cyberdesk-shell-out", daemon=True)
    try:
        if saved is not None:
            tty.setraw(stdin)
            previous[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, on_winch)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_int)
        reader.start()
        stdin_open = True
        first_output.wait(3.0)
        while not ended.is_set():
            if not stdin_open:
                ended.wait(0.1)
                continue
            try:
                readable, _, _ = select.select([stdin], [], [], 0.1)
            except InterruptedError:
                continue
            if readable:
                data = os.read(stdin, 65536)
                if data:
                    session.send(data)
                else:
                    # Local end-of-input: ^D tells the remote shell the same.
                    session.send(b"\x04")
                    stdin_open = False
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        session.close()
    if session.error is not None:
        raise session.error
    exited = session.exited
    if exited is None:
        return 1
    if exited.signal:
        return 128 + exited.signal
    return exited.exit_code


def _as_error(err: Exception) -> Any:
    from cyberdesk._errors import CyberdeskError

    return err if isinstance(err, CyberdeskError) else CyberdeskError(str(err))
