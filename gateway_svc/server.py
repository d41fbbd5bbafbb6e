"""Wiring of gateway_svc: the gRPC port (public services, key management) and the REST port.

Both faces run in one event loop and share one `Admission` (key, scope, rate limit, tenant,
route), one route cache with its channel pool, and one rate limiter. The REST face is a uvicorn server
started in-process on CYBERDESK_GATEWAY_HTTP_ADDR once gRPC serves, and stopped before gRPC drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

from cyberdesk_common.channel_options import CHANNEL_OPTIONS
from cyberdesk_common.grpc_server import RunningServer, ServerSpec
from cyberdesk_common.tracing import TracingClientInterceptor
from cyberdesk_proto.internal.v1 import auth_pb2, auth_pb2_grpc
from cyberdesk_proto.v1 import ports_pb2, ports_pb2_grpc
from gateway_svc.admission import Admission
from gateway_svc.auth import Authenticator, KeyBackend
from gateway_svc.config import GatewayConfig
from gateway_svc.gate import Gate
from gateway_svc.keys_api import AuthServicer
from gateway_svc.keystore import KeyStore
from gateway_svc.lost_calls import ExplainingUpstream
from gateway_svc.proxy import Proxy, public_service_names
from gateway_svc.ratelimit import RateLimiter
from gateway_svc.rest.app import RestApp
from gateway_svc.rest.console_static import ConsoleFiles
from gateway_svc.rest.desktop_stream import DesktopViewers, DesktopViewerServicer
from gateway_svc.rest.preview import Previews, PreviewServicer, websocket_protocol
from gateway_svc.rest.preview_links import PreviewTokens
from gateway_svc.rest.upstream import GatewayUpstream
from gateway_svc.revocation import OpenCalls, RevocableUpstream, RevocationInterceptor
from gateway_svc.routing import RouteCache, follow_events
from gateway_svc.sessions import Sessions
from gateway_svc.unkey_plans import PlanSync

if TYPE_CHECKING:
    from gateway_svc.unkey_backend import UnkeyBackend

_log = logging.getLogger("gateway_svc")

# How long the REST face keeps an idle HTTP/1.1 connection open (uvicorn's default is 5 s). Longer
# than clients keep theirs (Node's undici 4 s, browsers about 60 s... and a load balancer's 60 s), so
# the client is the one that closes: a server that closes first races a client reusing the
# connection, which then fails with a reset (UND_ERR_SOCKET), most often on a loaded machine where
# the client's own idle timer fires late.
HTTP_IDLE_SECONDS = 75


def key_store_path(config: GatewayConfig) -> str:
    """Where the local key store lives."""
    return str(config.state_dir / "gateway_keys.sqlite3")


class Gateway:
    """The gateway's parts, created inside the event loop (channels and clients are loop-bound)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.store: KeyStore | None = None
        self.unkey: UnkeyBackend | None = None
        self.route_cache: RouteCache | None = None
        self.limiter: RateLimiter | None = None
        self.instance_channel: grpc.aio.Channel | None = None
        self.billing_channel: grpc.aio.Channel | None = None
        self._stop = asyncio.Event()
        self._events: asyncio.Task[None] | None = None
        self.admission: Admission | None = None
        self.previews: Previews | None = None
        self.desktop: DesktopViewers | None = None
        self.keys: AuthServicer | None = None
        self.sessions: Sessions | None = None  # the web console's sign-ins (REST face only)
        self.http: Any = None  # uvicorn.Server once the REST face serves
        self._http_task: asyncio.Task[None] | None = None
        # Open calls per key, ended when their key is revoked (within the auth cache's TTL).
        self.open_calls = OpenCalls(interval=config.auth_cache_seconds)
        self._sweeper: asyncio.Task[None] | None = None

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        """Build the parts and add the proxy and AuthService to `server`."""
        config = self.config
        backend: KeyBackend
        if config.unkey_root_key:
            # Imported here: the Unkey client (and the pydantic models under it) is three quarters
            # of the gateway's import time, which a restart under `cyberdesk up` waits for.
            from gateway_svc.unkey_backend import UnkeyBackend

            self.unkey = backend = UnkeyBackend(
                config.unkey_root_key,
                config.unkey_api_id,
                config.unkey_server_url,
                config.unkey_keyspace,
                plans=PlanSync(lambda: self.billing_channel, config.internal_token),
            )
        else:
            from pathlib import Path

            self.store = backend = KeyStore(Path(key_store_path(config)))
        self.limiter = RateLimiter(config.redis_url)
        authenticator = Authenticator(backend, ttl=config.auth_cache_seconds, max_entries=config.auth_cache_size)
        self.open_calls.authenticator = authenticator
        gate = Gate(authenticator, self.limiter, config.default_limit)
        self.instance_channel = grpc.aio.insecure_channel(
            config.instance_target,
            options=list(CHANNEL_OPTIONS),
            interceptors=[TracingClientInterceptor()],  # type: ignore[list-item]
        )
        self.billing_channel = grpc.aio.insecure_channel(
            config.billing_target,
            options=list(CHANNEL_OPTIONS),
            interceptors=[TracingClientInterceptor()],  # type: ignore[list-item]
        )
        self.route_cache = RouteCache(self.instance_channel, config.internal_token, ttl=config.route_cache_seconds)
        self.admission = Admission(
            gate, self.route_cache, self.instance_channel, config.internal_token, billing_channel=self.billing_channel
        )
        server.add_generic_rpc_handlers((Proxy(self.admission),))
        # One servicer for both faces: REST's /v1/keys calls it with the HTTP credentials.
        self.keys = AuthServicer(gate, self.store)
        self.sessions = Sessions.from_env(gate, config.public_http_url)
        auth_pb2_grpc.add_AuthServiceServicer_to_server(self.keys, server)
        # Previews are the gateway's own: it holds the token secret and relays the ports' bytes.
        tokens = PreviewTokens.from_state_dir(config.state_dir, config.preview_secret)
        self.previews = Previews(self.admission, tokens, config.preview_domain, config.public_http_url)
        ports_pb2_grpc.add_PreviewServiceServicer_to_server(PreviewServicer(self.previews), server)
        # The live desktop: its viewer tokens are signed like preview tokens, with the same secret.
        self.desktop = DesktopViewers(
            self.admission, tokens, config.public_http_url, self.open_calls, config.cors, config.desktop_max_viewers
        )
        ports_pb2_grpc.add_DesktopViewerServiceServicer_to_server(DesktopViewerServicer(self.desktop), server)
        return [
            *public_service_names(),
            auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name,
            ports_pb2.DESCRIPTOR.services_by_name["PreviewService"].full_name,
            ports_pb2.DESCRIPTOR.services_by_name["DesktopViewerService"].full_name,
        ]

    async def on_started(self, running: RunningServer) -> None:
        """Start following lifecycle events (route cache invalidation)."""
        assert self.route_cache is not None
        self._events = asyncio.create_task(follow_events(self.route_cache, self.config.redis_url, self._stop))
        self._sweeper = asyncio.create_task(self.open_calls.run(self._stop), name="revocation-sweep")
        await self.start_http()
        _log.info(
            "gateway ready",
            extra={
                "auth_backend": "unkey" if self.unkey else "local",
                "instance_svc": self.config.instance_target,
                "default_rate_limit": str(self.config.default_limit),
                "http": self.config.http_addr,
            },
        )

    async def start_http(self) -> None:
        """Serve the REST face (uvicorn, in this event loop) on CYBERDESK_GATEWAY_HTTP_ADDR."""
        import uvicorn

        assert self.admission is not None
        host, _, port = self.config.http_addr.rpartition(":")
        # The REST face's calls: admitted like gRPC's, lost ones explained, revoked keys' ended.
        explaining = ExplainingUpstream(GatewayUpstream(self.admission), self.route_cache)
        upstream = RevocableUpstream(explaining, self.open_calls)
        config = uvicorn.Config(
            RestApp(
                upstream,
                previews=self.previews,
                keys=self.keys,
                cors=self.config.cors,
                desktop=self.desktop,
                sessions=self.sessions,
                console=ConsoleFiles(),
            ),
            host=host.strip("[]"),
            port=int(port),
            lifespan="off",
            log_config=None,  # our structured logging is set up already
            access_log=False,
            # uvicorn's websockets protocol, wrapped: a preview's upgrade is relayed as bytes.
            ws=websocket_protocol(self.previews) if self.previews is not None else "websockets",
            ssl_certfile=self.config.tls_cert_file or None,
            ssl_keyfile=self.config.tls_key_file or None,
            timeout_graceful_shutdown=5,
            timeout_keep_alive=HTTP_IDLE_SECONDS,
        )
        server = uvicorn.Server(config)
        # Not Server.serve(): it installs its own signal handlers; the gRPC side owns SIGTERM.
        config.load()
        server.lifespan = config.lifespan_class(config)
        await server.startup()
        self.http = server
        self._http_task = asyncio.create_task(server.main_loop())

    async def stop_http(self) -> None:
        """Stop accepting HTTP requests and let in-flight ones finish (bounded)."""
        server, task = self.http, self._http_task
        self.http, self._http_task = None, None
        if server is None or task is None:
            return
        server.should_exit = True
        await task
        await server.shutdown()

    async def on_stopping(self) -> None:
        """Stop the REST face and following events; channels close with the process after the drain."""
        await self.stop_http()
        self._stop.set()
        if self._events is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._events, 3.0)
        if self._sweeper is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._sweeper, 3.0)

    async def close(self) -> None:
        """Release every client (used by in-process tests; a process just exits)."""
        await self.on_stopping()
        if self.route_cache is not None:
            await self.route_cache.pool.close()
        if self.instance_channel is not None:
            await self.instance_channel.close(grace=None)
        if self.billing_channel is not None:
            await self.billing_channel.close(grace=None)
        if self.limiter is not None:
            await self.limiter.close()
        if self.unkey is not None:
            await self.unkey.close()
        if self.store is not None:
            self.store.close()


def build_spec(gateway: Gateway | None = None) -> ServerSpec:
    """The server of gateway_svc, listening on CYBERDESK_GATEWAY_ADDR (default 127.0.0.1:50051)."""
    gw = gateway or Gateway(GatewayConfig.from_env())
    return ServerSpec(
        name="gateway_svc",
        addresses=[gw.config.addr],
        register=gw.register,
        tls_cert_chain=gw.config.tls_cert,
        tls_private_key=gw.config.tls_key,
        interceptors=[RevocationInterceptor(gw.open_calls)],
    )
