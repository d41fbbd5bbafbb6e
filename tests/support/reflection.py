"""A real server-reflection client: lists the services a running server exposes."""

from __future__ import annotations

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def list_services(target: str, metadata: tuple[tuple[str, str], ...] = ()) -> set[str]:
    """Names of the services the server at `target` reports through reflection."""
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5, metadata=metadata
        )
        names: set[str] = set()
        for reply in replies:
            names.update(s.name for s in reply.list_services_response.service)
        return names
