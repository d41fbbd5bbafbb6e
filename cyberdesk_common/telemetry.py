"""OpenTelemetry setup shared by the services.

Tracing is always wired; spans are recorded, and leave the process, only when
OTEL_EXPORTER_OTLP_ENDPOINT is set and the OTLP exporter package is installed. Otherwise no SDK
provider is installed and the tracing interceptor only passes trace context on (see tracing.py).
"""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_log = logging.getLogger(__name__)


def setup_tracing(service: str) -> TracerProvider:
    """A TracerProvider named after `service` (to shut down at exit), global when it exports spans."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError:
            _log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not installed")
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
            trace.set_tracer_provider(provider)
    # Without an exporter no span would be read: the interceptor then records none (tracing._hop).
    return provider
