"""Ending the open calls of a key that stopped verifying (revoked, expired, deleted).

A new call is refused within the auth cache's TTL of a revocation (`auth.Authenticator`); a call
that was admitted before would otherwise run on for as long as its stream lasts. `OpenCalls`
keeps the open calls per key (by the sha256 of the secret, like the cache) and `sweep` re-verifies
each key that has open calls at the backend, bypassing the cache, every `interval` seconds
(CYBERDESK_AUTH_CACHE_SECONDS, 5 s by default): the same bound as for new calls. A key that no
longer verifies has its calls ended with the status a new call would get (UNAUTHENTICATED "the
API key was revoked or disabled") and is dropped from the cache, so new calls fail at once too.

How a call is ended: `track()` is an async context manager around the call's handler, in the
task that runs it (a gRPC handler task, or the HTTP request's task). Ending cancels that task and
the context manager turns the cancellation into the RpcError, the way `asyncio.timeout` turns its
own into TimeoutError (Task.uncancel tells ours from any other). The cancellation reaches
whatever the handler awaits, normally the upstream's next message, and the handler's own
`finally` cancels the upstream call. Where the task is elsewhere at that instant (writing a
message to a client that does not read), the call still ends, as CANCELLED.

Both faces go through here: `RevocationInterceptor` wraps every gRPC method of the gateway,
`RevocableUpstream` every REST call (including the WebSocket shell's bidirectional call).
Not swept: keys that are not cacheable (Unkey keys with credits), since each verification of
those spends a credit; and a backend that cannot answer (Unkey down) ends nothing, as the cache
would keep serving those keys too. Both are limits, written down in docs/gateway.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.message import Message

from cyberdesk_common.server_interceptors import Handler, MethodWrappingInterceptor
from cyberdesk_common.status import RpcError
from gateway_svc.auth import Authenticator, extract_key
from gateway_svc.rest.http_bindings import HttpBinding
from gateway_svc.rest.upstream import BidiStream, StreamHead, Upstream, WrappedBidi, credentials

_log = logging.getLogger("gateway_svc.revocation")

# Statuses of a re-verification that end a key's calls: the key is gone (revoked, expired,
# unknown) or may no longer do what it does. RESOURCE_EXHAUSTED (credits, rate) does not.
_ENDING = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class Tracked:
    """One open call of a key: the task that runs it, and the error it was ended with."""

    def __init__(self, calls: OpenCalls, digest: bytes, secret: str) -> None:
        self._calls = calls
        self._digest = digest
        self._secret = secret
        self._task: asyncio.Task[Any] | None = None
        self.ended: RpcError | None = None

    async def __aenter__(self) -> Tracked:
        self._task = asyncio.current_task()
        self._calls._add(self._digest, self._secret, self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._calls._remove(self._digest, self)
        ours = self.ended is not None and exc_type is asyncio.CancelledError and self._task is not None
        # Only our cancellation becomes the error: if the caller left meanwhile, the task was
        # cancelled twice and the cancellation goes on.
        if ours and self._task is not None and self._task.uncancel() == 0 and self.ended is not None:
            raise self.ended from None

    def end(self, error: RpcError) -> None:
        """End the call with `error` (at most once)."""
        if self.ended is None and self._task is not None and not self._task.done():
            self.ended = error
            self._task.cancel()


@dataclass
class OpenCalls:
    """The open calls per key, and the sweep that ends those of keys that stopped verifying."""

    authenticator: Authenticator | None = None  # set once the gateway has built it
    interval: float = 5.0
    _calls: dict[bytes, set[Tracked]] = field(default_factory=dict)
    _secrets: dict[bytes, str] = field(default_factory=dict)

    def track(self, metadata: Sequence[tuple[str, str | bytes]]) -> Tracked | _Untracked:
        """The context manager of one call presenting `metadata`; untracked when it carries no key."""
        try:
            secret = extract_key(metadata)
        except RpcError:
            return _UNTRACKED  # refused at admission anyway
        return Tracked(self, hashlib.sha256(secret.encode()).digest(), secret)

    def _add(self, digest: bytes, secret: str, call: Tracked) -> None:
        self._calls.setdefault(digest, set()).add(call)
        self._secrets[digest] = secret

    def _remove(self, digest: bytes, call: Tracked) -> None:
        calls = self._calls.get(digest)
        if calls is None:
            return
        calls.discard(call)
        if not calls:
            del self._calls[digest]
            del self._secrets[digest]

    def open_count(self) -> int:
        """How many calls are open (for tests and the log)."""
        return sum(len(calls) for calls in self._calls.values())

    async def sweep(self) -> int:
        """Re-verify every key with open calls (bypassing the cache); returns how many calls were ended."""
        authenticator = self.authenticator
        if authenticator is None:
            return 0
        ended = 0
        for digest, secret in list(self._secrets.items()):
            if authenticator.metered(secret):
                continue  # a verification would spend a credit (see the module doc)
            try:
                verification = await authenticator.backend.verify(secret)
            except RpcError as err:
                _log.warning("could not re-verify a key with open calls", extra={"error": err.message})
                continue
            error = verification.to_error()
            if error is None or error.code not in _ENDING:
                continue
            authenticator.forget(secret)
            calls = list(self._calls.get(digest, ()))
            for call in calls:
                call.end(error)
            ended += len(calls)
            _log.info("ended the open calls of a key that no longer verifies", extra={"calls": len(calls)})
        return ended

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every `interval` seconds until `stop` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
            if not stop.is_set() and self._secrets:
                await self.sweep()


class _Untracked:
    """The context manager of a call without a key: nothing to track."""

    async def __aenter__(self) -> _Untracked:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


_UNTRACKED = _Untracked()


class RevocationInterceptor(MethodWrappingInterceptor):
    """Runs every gRPC method of the gateway inside `OpenCalls.track` (inside the error mapping)."""

    def __init__(self, calls: OpenCalls) -> None:
        super().__init__()
        self._open = calls

    def wrap(self, method: str, fn: Handler, streaming: bool) -> Handler:
        """`fn`, ended with UNAUTHENTICATED when its key stops verifying."""
        calls = self._open
        if streaming:

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # type: ignore[type-arg]
                async with calls.track(tuple(context.invocation_metadata() or ())):
                    async for item in fn(request, context):
                        yield item

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[type-arg]
            async with calls.track(tuple(context.invocation_metadata() or ())):
                return await fn(request, context)

        return unary


class RevocableUpstream:
    """`Upstream` whose calls are tracked by key, so a revocation ends REST streams and WebSocket shells too."""

    def __init__(self, inner: Upstream, calls: OpenCalls) -> None:
        self._inner = inner
        self._open = calls

    async def unary(self, binding: HttpBinding, request: Message, headers: Mapping[str, str]) -> Message:
        """One request, one response."""
        async with self._open.track(credentials(headers)):
            return await self._inner.unary(binding, request, headers)

    async def server_stream(
        self, binding: HttpBinding, request: Message, headers: Mapping[str, str]
    ) -> AsyncIterator[Message | StreamHead]:
        """One request, a stream of responses."""
        async with self._open.track(credentials(headers)):
            async for message in self._inner.server_stream(binding, request, headers):
                yield message

    async def client_stream(
        self, binding: HttpBinding, requests: AsyncIterator[Message], headers: Mapping[str, str]
    ) -> Message:
        """A stream of requests, one response."""
        async with self._open.track(credentials(headers)):
            return await self._inner.client_stream(binding, requests, headers)

    async def open_bidi(self, binding: HttpBinding, instance_id: str, headers: Mapping[str, str]) -> BidiStream:
        """Admit and open a bidirectional call; it is tracked while its responses are read."""
        call = await self._inner.open_bidi(binding, instance_id, headers)
        return _RevocableBidi(call, self._open, credentials(headers))


class _RevocableBidi(WrappedBidi):
    """A bidirectional call tracked while its responses are read (the relay's main task)."""

    def __init__(self, call: BidiStream, calls: OpenCalls, metadata: Sequence[tuple[str, str]]) -> None:
        super().__init__(call)
        self._open = calls
        self._metadata = metadata

    async def responses(self) -> AsyncIterator[Message]:
        """The responses; raises UNAUTHENTICATED (and cancels the call) when the key is revoked meanwhile."""
        try:
            async with self._open.track(self._metadata):
                async for message in self._call.responses():
                    yield message
        except RpcError:
            self._call.cancel()
            raise
