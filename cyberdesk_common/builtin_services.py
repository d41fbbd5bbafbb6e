"""The standard services every one of our gRPC servers carries besides its own: health and reflection.

Their calls need no credentials (a load balancer or `grpcurl` probes them), and they are neither
traced nor access-logged (health probes would drown the real calls). One list, used by the
tracing and access-log interceptors (cyberdesk_common) and the guest agent's token check.
"""

from __future__ import annotations

BUILTIN_METHOD_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def is_builtin_method(method: str) -> bool:
    """Whether `method` ("/pkg.Service/Method") belongs to the health or reflection service."""
    return method.startswith(BUILTIN_METHOD_PREFIXES)
