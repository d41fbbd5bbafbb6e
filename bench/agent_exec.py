"""Exec latency: `echo hi` through the guest agent (gRPC, unix socket) next to the FastAPI execD.

Sequential calls on one warm connection each, after a warm-up. The agent is measured on its unix
socket (how the local runtime and the gateway reach it); over TCP it only serves TLS, so a clear
loopback TCP figure would not describe a real deployment. The baseline is measured over loopback
TCP with a keep-alive HTTP/1.1 client, which is how the original design was called.

Rows:
  agent argv [echo hi]             no shell at all (what StartProcess with argv does)
  agent argv [sh -c 'echo hi']     the same work as the baseline (which runs `sh -c` via shell=True)
  agent command 'echo hi'          a login bash (`bash -lc`), what StartProcess with command does
  fastapi execD POST /exec         the baseline, shell=True
The ratio compares like with like: baseline p50 / agent `sh -c` p50 (and p99).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import grpc

from bench._launch import Agent, agent, baseline_execd
from bench._report import latency_summary, report
from cyberdesk.v1 import process_pb2, process_pb2_grpc

N = int(os.environ.get("BENCH_N", "500"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "50"))


def _measure(call: Callable[[], None]) -> list[float]:
    for _ in range(WARMUP):
        call()
    samples = []
    for _ in range(N):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def _agent_call(running: Agent, channel: grpc.Channel, **fields: object) -> Callable[[], None]:
    stub = process_pb2_grpc.ProcessServiceStub(channel)
    request = process_pb2.StartProcessRequest(instance_id=running.instance_id, **fields)  # type: ignore[arg-type]

    def call() -> None:
        out = b""
        code = None
        for message in stub.StartProcess(request, metadata=running.metadata, timeout=30):
            event = message.event
            out += event.stdout
            if event.WhichOneof("event") == "exited":
                code = event.exited.exit_code
        if out != b"hi\n" or code != 0:
            raise RuntimeError(f"unexpected result {out!r} {code}")

    return call


def main() -> None:
    """Run the benchmark and write bench/results/agent_exec.json."""
    import httpx

    rows: list[dict[str, Any]] = []
    with agent() as running, grpc.insecure_channel(running.target) as channel:
        for label, fields in (
            ("agent argv [echo hi]", {"argv": ["echo", "hi"]}),
            ("agent argv [sh -c 'echo hi']", {"argv": ["sh", "-c", "echo hi"]}),
            ("agent command 'echo hi' (bash -lc)", {"command": "echo hi"}),
        ):
            rows.append(
                {
                    "target": label,
                    "transport": "gRPC unix socket",
                    **latency_summary(_measure(_agent_call(running, channel, **fields))),
                }
            )

    with baseline_execd() as url, httpx.Client(base_url=url) as client:

        def baseline() -> None:
            reply = client.post("/exec", json={"command": "echo hi"})
            body = reply.json()
            if reply.status_code != 200 or body["stdout"] != "hi\n" or body["exit_code"] != 0:
                raise RuntimeError(f"unexpected result {reply.status_code} {body}")

        rows.append(
            {
                "target": "fastapi execD POST /exec (sh -c)",
                "transport": "HTTP/1.1 TCP loopback keep-alive",
                **latency_summary(_measure(baseline)),
            }
        )

    same_work = rows[1]
    base = rows[-1]
    ratios = {
        "baseline_over_agent_sh_p50": round(base["p50_ms"] / same_work["p50_ms"], 2),
        "baseline_over_agent_sh_p99": round(base["p99_ms"] / same_work["p99_ms"], 2),
        "baseline_over_agent_argv_p50": round(base["p50_ms"] / rows[0]["p50_ms"], 2),
    }
    report("agent_exec", rows, ratios=ratios, calls=N, warmup=WARMUP)


if __name__ == "__main__":
    main()
