"""The start-up sequence every service's `__main__` shares."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from cyberdesk import keep_large_blocks
from cyberdesk_common.config import ConfigError, env_str
from cyberdesk_common.grpc_server import RunningServer, ServerSpec, serve
from cyberdesk_common.log import setup_logging
from cyberdesk_common.telemetry import setup_tracing


def run(
    name: str,
    build: Callable[[], ServerSpec],
    on_started: Callable[[RunningServer], Awaitable[None]] | None = None,
    on_stopping: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Set up logging and tracing, build the server spec, serve until SIGTERM. Returns an exit code."""
    log = setup_logging(name, env_str("LOG_LEVEL", "INFO"))
    # Every service relays megabyte messages somewhere (file chunks, screenshots); see cyberdesk._malloc.
    keep_large_blocks()
    provider = setup_tracing(name)
    try:
        spec = build()
    except (ConfigError, OSError) as err:
        log.error("bad configuration", extra={"error": str(err)})
        return 2
    try:
        asyncio.run(serve(spec, on_started, on_stopping))
    finally:
        provider.shutdown()
        logging.shutdown()
    return 0


class ServiceApp(Protocol):
    """What a service's `build_app()` returns: its server spec and what runs around serving."""

    spec: ServerSpec

    async def on_started(self, running: RunningServer) -> None:
        """Called once the server listens."""
        ...

    async def on_stopping(self) -> None:
        """Called when SIGTERM arrives, before the server drains."""
        ...


def run_app(name: str, build_app: Callable[[], ServiceApp]) -> int:
    """`run` for a service built as one object (instance_svc, billing_svc): `python -m <service>`."""
    built: list[ServiceApp] = []

    def build() -> ServerSpec:
        built.append(build_app())
        return built[0].spec

    async def started(running: RunningServer) -> None:
        await built[0].on_started(running)

    async def stopping() -> None:
        await built[0].on_stopping()

    return run(name, build, started, stopping)
