"""gRPC channel and server options shared by every service, so limits cannot drift between hops.

A message of up to `MAX_MESSAGE_BYTES` (file chunks, screenshots) must pass client -> gateway ->
agent unchanged, so every server and every channel between our processes uses the same limit.
The SDK (`cyberdesk/`) keeps its own copy on purpose: it must not import the servers' package.
"""

from __future__ import annotations

from typing import Any

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# Every gRPC server (cyberdesk_common.grpc_server.start).
SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Clients ping idle channels (keepalive below); a server that rejected those pings would
    # close the channel with GOAWAY "too_many_pings".
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
)

# Every channel from one of our services to another (gateway -> instance_svc, -> agents;
# instance_svc -> agents).
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # An agent that went away must fail the next call quickly, not after the default 1-120 s
    # reconnect backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)
