"""The tracing interceptor without an exporter: no span recorded, trace context still passed on."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cyberdesk_common import tracing

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


class _Context:
    """The two methods of a grpc.aio servicer context the wrapper reads."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def code(self) -> None:
        return None


def _sent(metadata: tuple[tuple[str, str], ...], streaming: bool) -> str:
    """The traceparent a handler wrapped by the interceptor would send upstream."""
    seen: list[str] = []

    async def unary(request: Any, context: Any) -> str:
        seen.append(dict(tracing.inject_metadata())["traceparent"])
        return "reply"

    async def stream(request: Any, context: Any) -> Any:
        seen.append(dict(tracing.inject_metadata())["traceparent"])
        yield "reply"

    async def run() -> None:
        if streaming:
            assert [r async for r in tracing._wrap("/p.S/M", stream, True)(None, _Context(metadata))] == ["reply"]
        else:
            assert await tracing._wrap("/p.S/M", unary, False)(None, _Context(metadata)) == "reply"

    asyncio.run(run())
    return seen[0]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_hop_continues_the_callers_trace_under_a_span_id_of_its_own(
    monkeypatch: pytest.MonkeyPatch, streaming: bool
) -> None:
    monkeypatch.setattr(tracing, "_recording", lambda: False)
    sent = _sent((("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),), streaming)
    version, trace_id, span_id, flags = sent.split("-")
    assert (version, trace_id, flags) == ("00", CALLER_TRACE, "01")
    assert span_id != CALLER_SPAN and int(span_id, 16) != 0


def test_a_call_without_a_trace_starts_a_sampled_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "_recording", lambda: False)
    first, second = (_sent((), False).split("-") for _ in range(2))
    assert first[3] == "01" and int(first[1], 16) != 0
    assert first[1] != second[1]  # a new trace per call
