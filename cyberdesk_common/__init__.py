"""Code shared by every Cyberdesk service; each cross-service fact is defined here once.

- `config`, `log`, `telemetry`, `tracing`, `status`: configuration, JSON logs, tracing, statuses.
- `grpc_server`, `service`, `server_interceptors`, `builtin_services`: gRPC bootstrap and the
  interceptors every server runs (health and reflection are left open and unlogged).
- `lifecycle_events`: the lifecycle event (record, states, stream name, the one tail reader).
- `metadata`: the metadata names between our processes; `agent_channel`: dialing a guest
  agent; `channel_options`: message limits and keepalive of every server and channel.
"""
