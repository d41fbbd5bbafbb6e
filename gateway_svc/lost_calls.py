"""The REST face's lost calls, explained like the gRPC face's: "instance i-... was deleted", not "not reachable".

The gRPC proxy asks `routing.explain_lost` when a call to an agent fails under its caller
(proxy.py, `_fail`). The REST upstream turns the same failures into an `RpcError` synchronously,
where no question to instance_svc fits; `ExplainingUpstream` wraps it and asks afterwards, for
every call bound to an instance (the request's `instance_id`, or the WebSocket shell's).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import grpc
from google.protobuf.message import Message

from cyberdesk_common.status import RpcError
from gateway_svc.rest.http_bindings import HttpBinding
from gateway_svc.rest.upstream import BidiStream, StreamHead, Upstream, WrappedBidi
from gateway_svc.routing import explain_lost

# What an upstream failure of a lost call looks like after the REST upstream mapped it.
_LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def _instance_of(request: Message) -> str:
    value = getattr(request, "instance_id", "")
    return value if isinstance(value, str) else ""


async def _explained(routes: object, instance_id: str, err: RpcError) -> RpcError:
    if err.code not in _LOST or not instance_id:
        return err
    code, message = await explain_lost(routes, instance_id, err.code, err.message)
    if (code, message) == (err.code, err.message):
        return err
    return RpcError(code, message)


class ExplainingUpstream:
    """`Upstream` whose lost calls to an agent name what happened to the instance."""

    def __init__(self, inner: Upstream, routes: object) -> None:
        self._inner = inner
        self._routes = routes  # the gateway's RouteCache (anything else: errors unchanged)

    async def unary(self, binding: HttpBinding, request: Message, headers: Mapping[str, str]) -> Message:
        """One request, one response."""
        try:
            return await self._inner.unary(binding, request, headers)
        except RpcError as err:
            raise await _explained(self._routes, _instance_of(request), err) from None

    async def server_stream(
        self, binding: HttpBinding, request: Message, headers: Mapping[str, str]
    ) -> AsyncIterator[Message | StreamHead]:
        """One request, a stream of responses."""
        try:
            async for message in self._inner.server_stream(binding, request, headers):
                yield message
        except RpcError as err:
            raise await _explained(self._routes, _instance_of(request), err) from None

    async def client_stream(
        self, binding: HttpBinding, requests: AsyncIterator[Message], headers: Mapping[str, str]
    ) -> Message:
        """A stream of requests, one response (client streams end quickly; passed through)."""
        return await self._inner.client_stream(binding, requests, headers)

    async def open_bidi(self, binding: HttpBinding, instance_id: str, headers: Mapping[str, str]) -> BidiStream:
        """Admit and open a bidirectional call whose lost end is explained."""
        return _ExplainingBidi(await self._inner.open_bidi(binding, instance_id, headers), self._routes, instance_id)


class _ExplainingBidi(WrappedBidi):
    def __init__(self, call: BidiStream, routes: object, instance_id: str) -> None:
        super().__init__(call)
        self._routes = routes
        self._instance_id = instance_id

    async def responses(self) -> AsyncIterator[Message]:
        """The responses; a lost end names what happened to the instance."""
        try:
            async for message in self._call.responses():
                yield message
        except RpcError as err:
            raise await _explained(self._routes, self._instance_id, err) from None
