"""`instance.ports`: links to services listening on TCP ports inside the instance (previews)."""

from __future__ import annotations

from cyberdesk._async._transport import AsyncTransport
from cyberdesk._models import PreviewLink
from cyberdesk._requests import duration
from cyberdesk_proto.v1 import ports_pb2


class AsyncPorts:
    """`instance.ports`: the gateway relays HTTP and WebSocket to a port inside the instance.

    A server started inside (`python3 -m http.server 3000`) is reached at
    `http://3000-<instance>.<preview domain>/` or `<gateway>/v1/instances/<instance>/ports/3000/`,
    with the API key, or with a signed, expiring link from `link()`.
    """

    def __init__(self, transport: AsyncTransport, instance_id: str) -> None:
        self._t = transport
        self._instance_id = instance_id

    async def url(self, port: int, *, signed: bool = False, ttl: float = 3600.0, path_form: bool = False) -> str:
        """The preview URL of `port` (host form; `path_form=True` for the path form).

        Unsigned, the URL needs the API key (an `authorization` or `x-api-key` header); `signed=True`
        returns a URL carrying a token that lets anyone holding it in for `ttl` seconds (a browser,
        a colleague), as E2B's `get_host` and Daytona's signed preview links do.
        """
        link = await self.link(port, public=signed, ttl=ttl)
        return link.path_url if path_form else link.url

    async def link(self, port: int, *, public: bool = False, ttl: float = 3600.0) -> PreviewLink:
        """Mint a token for `port` valid for `ttl` seconds, with both URL forms (`public`: the URLs carry it)."""
        request = ports_pb2.CreatePreviewUrlRequest(
            instance_id=self._instance_id, port=port, ttl=duration(ttl, "ttl"), public=public
        )
        reply = await self._t.unary(self._t.previews.CreatePreviewUrl, request)
        return PreviewLink.from_proto(reply, public)
