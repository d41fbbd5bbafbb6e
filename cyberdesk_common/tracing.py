"""W3C trace context over gRPC metadata: one trace across gateway, instance_svc and the agents.

- `TracingServerInterceptor` (installed by `grpc_server.start()` for every service) reads
  `traceparent`/`tracestate` from the call's metadata and runs the handler inside a SERVER span
  that is a child of the caller's span.
- `inject_metadata()` adds the current span's `traceparent` to outgoing metadata (for code that
  builds metadata itself, like the gateway's proxy); `TracingClientInterceptor` does the same for
  every call of a grpc.aio channel (`grpc.aio.insecure_channel(..., interceptors=[TracingClientInterceptor()])`).

Without an exporter (`telemetry.setup_tracing` then installs no SDK provider) nothing would ever
read a span, so none is recorded: each call runs in a *hop* span instead, a bare span context
with a span id of its own under the caller's trace. Every service still passes on a traceparent
naming its own hop, so a downstream service that does export joins the caller's trace all the
same. Measured: an SDK span with its extract, inject and status cost ~75 us a call on the 2-core
bench machine, paid twice per exec through the gateway (gateway and agent).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from cyberdesk_common.server_interceptors import MethodWrappingInterceptor

_TRACE_KEYS = ("traceparent", "tracestate")


class _MetadataGetter(Getter[Sequence[tuple[str, Any]]]):
    def get(self, carrier: Sequence[tuple[str, Any]], key: str) -> list[str] | None:
        values = [v.decode() if isinstance(v, bytes) else str(v) for k, v in carrier if k == key]
        return values or None

    def keys(self, carrier: Sequence[tuple[str, Any]]) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _MetadataGetter()


def inject_metadata(metadata: Iterable[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """`metadata` without any incoming trace headers, plus those of the current span."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [(k, v) for k, v in metadata if k not in _TRACE_KEYS] + list(carrier.items())


def _recording() -> bool:
    """Whether spans go anywhere: an SDK provider is installed (by setup_tracing with an exporter, or a test)."""
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def _hop(parent: otel_context.Context) -> otel_context.Context:
    """`parent` with a non-recording span of this call as current: the caller's trace, a new span id.

    A call without a caller's trace starts one (sampled, as the SDK's default sampler would).
    """
    caller = trace.get_current_span(parent).get_span_context()
    trace_id = caller.trace_id if caller.is_valid else 0
    while not trace_id:
        trace_id = random.getrandbits(128)
    span_id = 0
    while not span_id:
        span_id = random.getrandbits(64)
    flags = caller.trace_flags if caller.is_valid else TraceFlags(TraceFlags.SAMPLED)
    hop = SpanContext(trace_id, span_id, is_remote=False, trace_flags=flags, trace_state=caller.trace_state)
    return trace.set_span_in_context(NonRecordingSpan(hop), parent)


def _span_name(method: str) -> str:
    # "/cyberdesk.v1.ProcessService/StartProcess" -> "cyberdesk.v1.ProcessService/StartProcess"
    return method.lstrip("/")


def _finish(span: trace.Span, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))


def _wrap(method: str, fn: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
    tracer = trace.get_tracer("cyberdesk.grpc")
    attributes = {"rpc.system": "grpc", "rpc.method": method}

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[type-arg]
        carrier: Sequence[tuple[str, Any]] = tuple(context.invocation_metadata() or ())
        parent = propagate.extract(carrier, getter=_GETTER)
        if not _recording():
            token = otel_context.attach(_hop(parent))
            try:
                return await fn(request, context)
            finally:
                otel_context.detach(token)
        with tracer.start_as_current_span(
            _span_name(method), context=parent, kind=SpanKind.SERVER, attributes=attributes
        ) as span:
            try:
                return await fn(request, context)
            finally:
                _finish(span, context)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # type: ignore[type-arg]
        carrier: Sequence[tuple[str, Any]] = tuple(context.invocation_metadata() or ())
        parent = propagate.extract(carrier, getter=_GETTER)
        recording = _recording()
        span = (
            tracer.start_span(_span_name(method), context=parent, kind=SpanKind.SERVER, attributes=attributes)
            if recording
            else None
        )
        span_context = trace.set_span_in_context(span, parent) if span is not None else _hop(parent)
        inner = fn(request, context).__aiter__()
        # The span is current only while the handler runs (each step of `inner`), never across our
        # own `yield`: a cancelled stream is closed from another context, where detaching a token
        # attached before the yield fails ("Failed to detach context") on every client cancel.
        try:
            while True:
                token = otel_context.attach(span_context)
                try:
                    item = await inner.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    otel_context.detach(token)
                yield item
        finally:
            if span is not None:
                _finish(span, context)
                span.end()

    return stream if streaming else unary


class TracingServerInterceptor(MethodWrappingInterceptor):
    """A SERVER span per call, child of the caller's `traceparent` when there is one."""

    def wrap(self, method: str, fn: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
        """`fn` run inside the call's SERVER span."""
        return _wrap(method, fn, streaming)


def _with_trace(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    metadata = inject_metadata(tuple(details.metadata or ()))
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*metadata),
        details.credentials,
        details.wait_for_ready,
    )


class TracingClientInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds the current span's `traceparent` to every outgoing call of a channel."""

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_with_trace(client_call_details), request)

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_with_trace(client_call_details), request)

    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_trace(client_call_details), request_iterator)

    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_trace(client_call_details), request_iterator)
