"""The gateway's REST face (HTTP/JSON, NDJSON/SSE streams, raw file bytes, a WebSocket PTY), one concern per module.

Pure (no I/O; unit-tested without sockets):

- `path_templates`: parse and match `google.api.http` path templates (`TemplateMatcher`);
- `http_bindings`: the table of HTTP bindings built from the service descriptors (where a REST
  request finds its RPC);
- `json_mapping`: HTTP request -> request message, response message -> JSON;
- `http_errors`: gRPC status -> HTTP status and the `google.rpc.Status` body;
- `ranges`: a Range header -> what to ask the agent for and what to answer (206 / 416);
- `control_frames`: the JSON control frames of the WebSocket PTY;
- `openapi`: the OpenAPI 3.1 document.

I/O (ASGI):

- `app`: the ASGI entry point, dispatch by the kind of binding, unary calls;
- `asgi`: the ASGI types, body readers and response helpers the handlers share;
- `streams`: server streams as NDJSON or SSE, client streams from an NDJSON body;
- `downloads`: ranged raw downloads with the sha256 check; `uploads`: raw-body uploads;
- `pty_relay`: the WebSocket handshake and the relay to ConnectPty;
- `upstream`: the `Upstream` interface the handlers call, and its implementation over the
  gateway's admission path.
"""
