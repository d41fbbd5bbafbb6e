"""Serving the emulator: on a thread of its own (tests), in the foreground (`python -m kube_emulator`).

Either way it listens on 127.0.0.1 over plain HTTP, and `write_kubeconfig` writes the file the real
`kubernetes` clients and kopf read (`KUBECONFIG=<file>`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import kmock
import yaml

from kube_emulator.emulator import Emulator

T = TypeVar("T")


def kubeconfig(url: str, namespace: str = "default") -> dict[str, Any]:
    """A kubeconfig with one cluster, user and context pointing at `url` (no credentials: none are checked)."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator", "user": {"token": "emulator"}}],
        "contexts": [
            {"name": "emulator", "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace}}
        ],
        "current-context": "emulator",
        "preferences": {},
    }


def write_kubeconfig(path: Path, url: str, namespace: str = "default") -> Path:
    path.write_text(yaml.safe_dump(kubeconfig(url, namespace)))
    return path


async def _serve(em: Emulator, port: int, started: Callable[[str], None], stop: asyncio.Event) -> None:
    async with kmock.Server(em, host="127.0.0.1", port=port or None) as server:  # type: ignore[arg-type]
        started(str(server.url).rstrip("/"))
        await stop.wait()
        em.close_watches()
        await asyncio.sleep(0)


class EmulatorThread:
    """The emulator served from a thread with its own event loop; `call` runs code on that loop.

    with EmulatorThread(namespaces=["cyberdesk"]) as api:
        api.url, api.write_kubeconfig(tmp / "kubeconfig"), api.call(lambda em: em.stats())
    """

    def __init__(self, port: int = 0, namespaces: Iterable[str] = ("default", "kube-system")) -> None:
        self._port = port
        self._namespaces = tuple(namespaces)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.url = ""
        self.emulator: Emulator | None = None

    def start(self) -> EmulatorThread:
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes emulator did not start within 30 s")
        if self._error is not None:
            raise RuntimeError(f"the Kubernetes emulator failed to start: {self._error!r}")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._stop = asyncio.Event()
            self.emulator = Emulator(namespaces=self._namespaces)

            def started(url: str) -> None:
                self.url = url
                self._ready.set()

            loop.run_until_complete(_serve(self.emulator, self._port, started, self._stop))
        except BaseException as e:
            self._error = e
            self._ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def call(self, fn: Callable[[Emulator], T], timeout: float = 30.0) -> T:
        """Run `fn(emulator)` on the emulator's loop (the store is not thread-safe) and return its result."""
        assert self._loop is not None and self.emulator is not None
        em = self.emulator

        async def run() -> T:
            return fn(em)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        """Run a coroutine on the emulator's loop (e.g. a virt-controller stand-in)."""
        assert self._loop is not None

        async def run() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        return write_kubeconfig(path, self.url, namespace)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)

    def __enter__(self) -> EmulatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def serve_forever(
    port: int, namespaces: Iterable[str], kubeconfig_path: Path | None, on_ready: Callable[[str], None]
) -> None:
    """Serve until cancelled (the `python -m kube_emulator` entry point)."""
    em = Emulator(namespaces=namespaces)
    stop = asyncio.Event()

    def started(url: str) -> None:
        if kubeconfig_path is not None:
            write_kubeconfig(kubeconfig_path, url)
        on_ready(url)

    await _serve(em, port, started, stop)
