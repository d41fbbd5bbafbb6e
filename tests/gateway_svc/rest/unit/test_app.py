"""The ASGI REST app over an in-process upstream: unary, streams (NDJSON and SSE), errors, openapi.json."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping

import grpc
import httpx
import pytest
from google.protobuf.message import Message

from cyberdesk_common.status import RpcError, not_found
from cyberdesk_proto.v1 import instance_pb2
from gateway_svc.rest.app import RestApp
from gateway_svc.rest.http_bindings import HttpBinding


class Upstream:
    """Answers GetInstance and WatchInstances from a dict; records the headers it was given."""

    def __init__(self) -> None:
        self.headers: list[Mapping[str, str]] = []

    async def unary(self, binding: HttpBinding, request: Message, headers: Mapping[str, str]) -> Message:
        self.headers.append(headers)
        assert isinstance(request, instance_pb2.GetInstanceRequest)
        if request.instance_id != "i-1":
            raise not_found(f"instance {request.instance_id} not found")
        return instance_pb2.GetInstanceResponse(instance={"instance_id": "i-1", "state": 3, "memory_mib": 512})

    async def server_stream(
        self, binding: HttpBinding, request: Message, headers: Mapping[str, str]
    ) -> AsyncIterator[Message]:
        assert isinstance(request, instance_pb2.WatchInstancesRequest)
        if request.instance_id == "none":
            raise RpcError(grpc.StatusCode.PERMISSION_DENIED, "not yours")
        yield instance_pb2.WatchInstancesResponse(event_id="1-0", previous_state=2)
        if request.instance_id == "fail":
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "agent gone")


def call(method: str, url: str, **kw: object) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=RestApp(Upstream()))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.request(method, url, **kw)  # type: ignore[arg-type]

    return asyncio.run(go())


def test_unary_json() -> None:
    r = call("GET", "/v1/instances/i-1", headers={"authorization": "Bearer k"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    inst = r.json()["instance"]
    assert inst["instanceId"] == "i-1" and inst["state"] == "INSTANCE_STATE_RUNNING" and inst["memoryMib"] == 512


def test_errors() -> None:
    r = call("GET", "/v1/instances/i-2")
    assert r.status_code == 404 and r.json() == {"code": 5, "message": "instance i-2 not found", "details": []}
    r = call("GET", "/v1/instances/i-1", params={"bogus": "1"})
    assert r.status_code == 400 and "unknown field 'bogus'" in r.json()["message"]
    r = call("PATCH", "/v1/instances/i-1")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"
    r = call("GET", "/nowhere")
    assert r.status_code == 404 and r.json()["code"] == 5
    r = call("GET", "/v1/instances/%zz")
    assert r.status_code == 400
    # The PTY is a WebSocket: a plain GET is told to upgrade (before any upstream call).
    r = call("GET", "/v1/instances/i-1/pty")
    assert r.status_code == 426 and r.headers["upgrade"] == "websocket" and r.json()["code"] == 3


def test_stream_ndjson_with_error_after_first_message() -> None:
    r = call("GET", "/v1/instances:watch", params={"instanceId": "fail"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines[0]["result"]["eventId"] == "1-0"
    assert lines[0]["result"]["previousState"] == "INSTANCE_STATE_STARTING"
    assert lines[1] == {"error": {"code": 14, "message": "agent gone", "details": []}}


def test_stream_clean_end_and_early_error() -> None:
    r = call("GET", "/v1/instances:watch")
    assert [list(json.loads(x)) for x in r.text.splitlines()] == [["result"]]
    r = call("GET", "/v1/instances:watch", params={"instance_id": "none"})
    assert r.status_code == 403 and r.json()["message"] == "not yours"


def test_stream_sse() -> None:
    r = call("GET", "/v1/instances:watch", params={"instanceId": "fail"}, headers={"accept": "text/event-stream"})
    assert r.headers["content-type"] == "text/event-stream"
    events = r.text.split("\n\n")
    assert events[0].startswith("event: result\ndata: {")
    assert events[1].startswith("event: error\ndata: ")
    assert json.loads(events[1].split("data: ", 1)[1])["error"]["code"] == 14


@pytest.mark.parametrize("path", ["/openapi.json"])
def test_openapi_json(path: str) -> None:
    r = call("GET", path)
    assert r.status_code == 200 and r.json()["openapi"] == "3.1.0"
