"""gRPC server bootstrap shared by every service.

`serve()` gives each service the same behaviour: the standard health service and server
reflection, one structured log line per call (method, status, duration, never metadata values),
expected errors (`RpcError`) turned into their status, unexpected ones into INTERNAL without a
stack trace to the caller, and a graceful stop on SIGTERM or SIGINT that lets in-flight calls
finish for a bounded time.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cyberdesk_common.channel_options import SERVER_OPTIONS
from cyberdesk_common.server_interceptors import Handler, MethodWrappingInterceptor
from cyberdesk_common.status import RpcError
from cyberdesk_common.tracing import TracingServerInterceptor

_log = logging.getLogger("cyberdesk.rpc")


def _wrap_unary(method: str, fn: Handler) -> Handler:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[type-arg]
        start, peer = time.perf_counter(), context.peer()
        try:
            return await fn(request, context)
        except RpcError as err:
            await _abort(context, err)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:
            _log.exception("unhandled error", extra={"method": method})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        finally:
            _access(method, context, start, peer)

    return wrapper


def _wrap_stream(method: str, fn: Handler) -> Handler:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # type: ignore[type-arg]
        start, peer = time.perf_counter(), context.peer()
        try:
            async for item in fn(request, context):
                yield item
        except RpcError as err:
            await _abort(context, err)
        except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception:
            _log.exception("unhandled error", extra={"method": method})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        finally:
            _access(method, context, start, peer)

    return wrapper


async def _abort(context: grpc.aio.ServicerContext, err: RpcError) -> None:  # type: ignore[type-arg]
    trailers = err.trailing_metadata()
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(err.code, err.message)


def _access(method: str, context: grpc.aio.ServicerContext, start: float, peer: str) -> None:  # type: ignore[type-arg]
    # `peer` is read when the call starts: context.peer() on a call the client already cancelled
    # dereferences freed call state inside grpcio (a segfault seen under load), so never call it here.
    code = context.code()
    name = code.name if isinstance(code, grpc.StatusCode) else ("CANCELLED" if context.cancelled() else "OK")
    _log.info(
        "rpc",
        extra={
            "method": method,
            "code": name,
            "ms": round((time.perf_counter() - start) * 1000, 3),
            "peer": peer,
        },
    )


class CallInterceptor(MethodWrappingInterceptor):
    """Access log and error mapping for every call (unary and streaming alike)."""

    def wrap(self, method: str, fn: Handler, streaming: bool) -> Handler:
        """`fn` with its access log line and its errors mapped to statuses."""
        return _wrap_stream(method, fn) if streaming else _wrap_unary(method, fn)


@dataclass
class ServerSpec:
    """What a service serves and where."""

    name: str
    addresses: Sequence[str]
    # Registers the service's servicers and returns their full names (for health and reflection).
    register: Callable[[grpc.aio.Server], Sequence[str]]
    grace_seconds: float = 10.0
    tls_cert_chain: bytes | None = None
    tls_private_key: bytes | None = None
    interceptors: Sequence[Any] = field(default_factory=tuple)  # grpc.aio.ServerInterceptor
    options: Sequence[tuple[str, Any]] = field(default_factory=tuple)


@dataclass
class RunningServer:
    """A started server with its bound addresses and a health servicer to flip."""

    server: grpc.aio.Server
    addresses: list[str]
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped)
    service_names: list[str]

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, then stop accepting calls and drain for at most `grace` seconds."""
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)


async def start(spec: ServerSpec) -> RunningServer:
    """Build and start the server described by `spec`."""
    server = grpc.aio.server(
        # Tracing outermost: the span covers the access log, the error mapping and the handler.
        interceptors=[TracingServerInterceptor(), CallInterceptor(), *spec.interceptors],
        options=[*SERVER_OPTIONS, *spec.options],
    )
    names = list(spec.register(server))
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    bound: list[str] = []
    for address in spec.addresses:
        if spec.tls_cert_chain and spec.tls_private_key and not address.startswith("unix:"):
            creds = grpc.ssl_server_credentials([(spec.tls_private_key, spec.tls_cert_chain)])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
        bound.append(address if address.startswith("unix:") else f"{address.rsplit(':', 1)[0]}:{port}")
    await server.start()
    return RunningServer(server, bound, health_servicer, names)


async def serve(
    spec: ServerSpec,
    on_started: Callable[[RunningServer], Awaitable[None]] | None = None,
    on_stopping: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run `spec` until SIGTERM or SIGINT, then stop gracefully."""
    log = logging.getLogger(spec.name)
    running = await start(spec)
    log.info("serving", extra={"addresses": running.addresses, "services": running.service_names})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_started is not None:
        await on_started(running)
    await stop.wait()
    log.info("stopping", extra={"grace_seconds": spec.grace_seconds})
    if on_stopping is not None:
        await on_stopping()
    await running.stop(spec.grace_seconds)
    log.info("stopped")
