"""`python -m kube_emulator --port N [--kubeconfig FILE] [--namespace NS ...]`: the emulator in the foreground.

Prints one line "kube-emulator listening on http://127.0.0.1:N" once it accepts connections (a
parent process waits for it), and writes FILE (a kubeconfig pointing at it) first when asked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from kube_emulator.runner import serve_forever


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kube_emulator", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--kubeconfig", type=Path, help="write a kubeconfig for the emulator to this file")
    parser.add_argument(
        "--namespace", action="append", default=[], help="a namespace to exist from the start (repeatable)"
    )
    args = parser.parse_args()
    namespaces = ["default", "kube-system", *args.namespace]

    def ready(url: str) -> None:
        print(f"kube-emulator listening on {url}", flush=True)

    async def run() -> None:
        task = asyncio.ensure_future(serve_forever(args.port, namespaces, args.kubeconfig, ready))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    sys.exit(0)


if __name__ == "__main__":
    main()
