"""PreviewService over gRPC, and previews of instances in states a real instance_svc rarely offers a test.

The gateway process in front of the routing stand-in (instance_svc.testing) and real guest agents
on this host (conftest.agent), so a test can pause an instance or kill its agent. The previewed
server is an HTTP server this test runs on the host's loopback, which is the agent's loopback here;
the sandboxed path (servers inside real sandboxes) is tests/gateway_svc/rest/e2e/test_previews.py.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import duration_pb2

from cyberdesk_proto.v1 import ports_pb2, ports_pb2_grpc
from cyberdesk_stack.processes import AgentProcess, stop
from tests.gateway_svc.conftest import AGENT_TOKEN, INTERNAL_TOKEN, agent, gateway_env
from tests.support.procs import ROOT, free_port, service


@dataclass
class PreviewStack:
    grpc_addr: str
    http_url: str
    keys: dict[str, str]
    agents: dict[str, AgentProcess]
    server_port: int


def _key(state: Path, tenant: str) -> str:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "gateway_svc", "keys", "create", "--tenant", tenant, "--name", "preview"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "CYBERDESK_STATE_DIR": str(state)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return next(line.split()[1] for line in out.splitlines() if line.startswith("secret"))


@pytest.fixture(scope="module")
def previews(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[PreviewStack]:
    tmp = tmp_path_factory.mktemp("previews")
    (tmp / "www").mkdir()
    (tmp / "www" / "hello.txt").write_text("hello from the host\n")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    routes_path = tmp / "routes.json"
    instance_addr, grpc_addr, http_port = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", free_port()
    state = tmp / "state"
    with contextlib.ExitStack() as ctx:
        agents = {name: ctx.enter_context(agent(tmp / "agents", name)) for name in ("i-run", "i-paused", "i-dies")}
        routes = {
            "i-run": ("tenant-a", "RUNNING"),
            "i-paused": ("tenant-a", "PAUSED"),
            "i-dies": ("tenant-a", "RUNNING"),
        }
        routes_path.write_text(
            json.dumps(
                {
                    name: {"tenant": tenant, "state": st, "target": agents[name].target, "token": AGENT_TOKEN}
                    for name, (tenant, st) in routes.items()
                }
            )
        )
        ctx.enter_context(
            service(
                "instance_svc.testing",
                instance_addr,
                {
                    "UPSTREAM_ADDR": instance_addr,
                    "UPSTREAM_ROUTES": str(routes_path),
                    "CYBERDESK_INTERNAL_TOKEN": INTERNAL_TOKEN,
                },
                tmp,
            )
        )
        env = gateway_env(state, instance_addr, redis_url, CYBERDESK_GATEWAY_ADDR=grpc_addr)
        env["CYBERDESK_GATEWAY_HTTP_ADDR"] = f"127.0.0.1:{http_port}"
        ctx.enter_context(service("gateway_svc", grpc_addr, env, tmp))
        keys = {"a": _key(state, "tenant-a"), "b": _key(state, "tenant-b")}
        try:
            yield PreviewStack(grpc_addr, f"http://127.0.0.1:{http_port}", keys, agents, server.server_address[1])
        finally:
            server.shutdown()


def _create(stack: PreviewStack, key: str | None, **fields: object) -> ports_pb2.CreatePreviewUrlResponse:
    with grpc.insecure_channel(stack.grpc_addr) as channel:
        stub = ports_pb2_grpc.PreviewServiceStub(channel)
        metadata = (("authorization", f"Bearer {key}"),) if key else ()
        reply: ports_pb2.CreatePreviewUrlResponse = stub.CreatePreviewUrl(
            ports_pb2.CreatePreviewUrlRequest(**fields),  # type: ignore[arg-type]
            metadata=metadata,
            timeout=20,
        )
        return reply


def _code(stack: PreviewStack, key: str | None, **fields: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        _create(stack, key, **fields)
    return err.value.code(), err.value.details() or ""


def test_create_preview_url_over_grpc(previews: PreviewStack) -> None:
    port = previews.server_port
    reply = _create(previews, previews.keys["a"], instance_id="i-run", port=port, ttl=duration_pb2.Duration(seconds=60))
    assert reply.path_url == f"{previews.http_url}/v1/instances/i-run/ports/{port}/"
    assert reply.url == f"http://{port}-i-run.localhost:{previews.http_url.rsplit(':', 1)[1]}/"
    assert reply.token and reply.expire_time.seconds > 0
    got = httpx.get(reply.path_url + "hello.txt", headers={"x-cyberdesk-preview-token": reply.token}, timeout=20)
    assert got.status_code == 200 and got.text == "hello from the host\n"
    public = _create(previews, previews.keys["a"], instance_id="i-run", port=port, public=True)
    assert httpx.get(public.path_url, timeout=20).status_code == 200


@pytest.mark.parametrize(
    ("key", "fields", "code"),
    [
        (None, {"instance_id": "i-run", "port": 80}, grpc.StatusCode.UNAUTHENTICATED),
        ("a", {"instance_id": "i-run", "port": 0}, grpc.StatusCode.INVALID_ARGUMENT),
        ("a", {"instance_id": "", "port": 80}, grpc.StatusCode.INVALID_ARGUMENT),
        (
            "a",
            {"instance_id": "i-run", "port": 80, "ttl": duration_pb2.Duration(seconds=8 * 86400)},
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ("b", {"instance_id": "i-run", "port": 80}, grpc.StatusCode.NOT_FOUND),
        ("a", {"instance_id": "i-nope", "port": 80}, grpc.StatusCode.NOT_FOUND),
    ],
)
def test_create_preview_url_refusals(
    previews: PreviewStack, key: str | None, fields: dict[str, object], code: grpc.StatusCode
) -> None:
    assert _code(previews, previews.keys[key] if key else None, **fields)[0] is code


def test_previews_of_a_paused_instance_and_of_a_dead_agent(previews: PreviewStack) -> None:
    headers = {"x-api-key": previews.keys["a"]}
    port = previews.server_port
    paused = httpx.get(f"{previews.http_url}/v1/instances/i-paused/ports/{port}/", headers=headers, timeout=20)
    assert paused.status_code == 400 and "not RUNNING" in paused.json()["message"]
    assert httpx.get(f"{previews.http_url}/v1/instances/i-dies/ports/{port}/", headers=headers).status_code == 200
    stop(previews.agents["i-dies"].proc)
    dead = httpx.get(f"{previews.http_url}/v1/instances/i-dies/ports/{port}/hello.txt", headers=headers, timeout=20)
    assert dead.status_code == 502
    assert dead.json()["message"] == "the agent of instance i-dies is unreachable"
    assert "sock" not in dead.text and "/tmp" not in dead.text
