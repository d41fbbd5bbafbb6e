"""Exec latency: `echo hi` through the guest agent (gRPC, unix socket) next to the FastAPI execD.

Sequential calls on one warm connection each, after a warm-up. The agent is measured on its unix
socket (how the local runtime and the gateway reach it); over TCP it only serves TLS, so a clear
loopback TCP figure would not describe a real deployment. The baseline is measured over loopback
TCP with a keep-alive HTTP/1.1 client, which is how the original design was called.

The machine is shared, so the rows are measured interleaved: rounds of BENCH_ROUND calls per row,
row after row, until each row has BENCH_N calls. A burst of load from elsewhere then hits every
row alike instead of skewing one. The load average before and after is recorded.

Rows:
  RunProcess argv [echo hi]              one request, one reply; no shell at all
  RunProcess argv [sh -c 'echo hi']      the same work as the baseline (which runs `sh -c` via shell=True)
  RunProcess command 'echo hi'           a login bash (`bash -lc`)
  RunProcess argv [echo hi] cwd=/tmp     a cwd other than the agent's own: glibc's posix_spawnp with
                                         its chdir action instead of os.posix_spawnp (subprocess
                                         before; see guest_agent/process_spawn.py)
  StartProcess ...                       the streamed exec: started, stdout and exited messages
  fastapi execD POST /exec               the baseline, shell=True
  gateway -> RunProcess / StartProcess   the same calls through gateway_svc (TCP loopback, API key,
                                         redis rate limit, routing stand-in; bench.gateway_proxy's
                                         set-up), the path the latency target is stated for
Every agent row but the cwd=/tmp one runs in the repository root, the agent's and the baseline's
working directory (in a sandbox the agent runs in its home, the default cwd, which has the
same effect). The ratios compare like with like: baseline / agent `sh -c` (p50 and p99).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import grpc

from bench._launch import ROOT, Caller, agent, baseline_execd
from bench._report import latency_summary, report
from cyberdesk_proto.v1 import process_pb2, process_pb2_grpc

N = int(os.environ.get("BENCH_N", "500"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "50"))
ROUND = int(os.environ.get("BENCH_ROUND", "50"))

Call = Callable[[], None]


def _measure_interleaved(calls: list[Call]) -> list[list[float]]:
    """Latencies in ms of each call, measured in interleaved rounds after a warm-up of each."""
    for call in calls:
        for _ in range(WARMUP):
            call()
    samples: list[list[float]] = [[] for _ in calls]
    while len(samples[0]) < N:
        size = min(ROUND, N - len(samples[0]))
        for call, out in zip(calls, samples, strict=True):
            for _ in range(size):
                start = time.perf_counter()
                call()
                out.append((time.perf_counter() - start) * 1000)
    return samples


def _check(out: bytes, code: int | None) -> None:
    if out != b"hi\n" or code != 0:
        raise RuntimeError(f"unexpected result {out!r} {code}")


def _start_call(running: Caller, channel: grpc.Channel, **fields: object) -> Call:
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
        _check(out, code)

    return call


def _run_call(running: Caller, channel: grpc.Channel, **fields: object) -> Call:
    stub = process_pb2_grpc.ProcessServiceStub(channel)
    request = process_pb2.RunProcessRequest(instance_id=running.instance_id, **fields)  # type: ignore[arg-type]

    def call() -> None:
        reply = stub.RunProcess(request, metadata=running.metadata, timeout=30)
        _check(reply.stdout, reply.exited.exit_code)

    return call


def main() -> None:
    """Run the benchmark and write bench/results/agent_exec.json."""
    import httpx

    here = str(ROOT)
    agent_rows: list[tuple[str, Callable[[Caller, grpc.Channel], Call]]] = [
        ("RunProcess argv [echo hi]", lambda a, c: _run_call(a, c, argv=["echo", "hi"], cwd=here)),
        ("RunProcess argv [sh -c 'echo hi']", lambda a, c: _run_call(a, c, argv=["sh", "-c", "echo hi"], cwd=here)),
        ("RunProcess command 'echo hi' (bash -lc)", lambda a, c: _run_call(a, c, command="echo hi", cwd=here)),
        (
            "RunProcess argv [echo hi] cwd=/tmp (posix_spawn + chdir)",
            lambda a, c: _run_call(a, c, argv=["echo", "hi"], cwd="/tmp"),
        ),
        ("StartProcess argv [echo hi]", lambda a, c: _start_call(a, c, argv=["echo", "hi"], cwd=here)),
        ("StartProcess argv [sh -c 'echo hi']", lambda a, c: _start_call(a, c, argv=["sh", "-c", "echo hi"], cwd=here)),
        ("StartProcess command 'echo hi' (bash -lc)", lambda a, c: _start_call(a, c, command="echo hi", cwd=here)),
    ]
    gateway_rows: list[tuple[str, Callable[[Caller, grpc.Channel], Call]]] = [
        ("gateway -> RunProcess argv [echo hi]", agent_rows[0][1]),
        ("gateway -> StartProcess argv [echo hi]", agent_rows[4][1]),
    ]
    gateway_error = ""
    load_before = os.getloadavg()
    with ExitStack() as stack:
        running = stack.enter_context(agent())
        channel = stack.enter_context(grpc.insecure_channel(running.target))
        client = stack.enter_context(httpx.Client(base_url=stack.enter_context(baseline_execd())))

        def baseline() -> None:
            reply = client.post("/exec", json={"command": "echo hi"})
            body = reply.json()
            if reply.status_code != 200 or body["stdout"] != "hi\n" or body["exit_code"] != 0:
                raise RuntimeError(f"unexpected result {reply.status_code} {body}")

        labels = [label for label, _ in agent_rows]
        calls = [make(Caller.of(running), channel) for _, make in agent_rows]
        try:
            from bench.gateway_proxy import gateway_in_front_of

            gw_addr, gw_metadata = stack.enter_context(gateway_in_front_of(running))
        except Exception as err:  # no redis-server, or the gateway did not start: say so, measure the rest
            gateway_error = f"{type(err).__name__}: {err}"
        else:
            via = stack.enter_context(grpc.insecure_channel(gw_addr))
            as_caller = Caller(gw_addr, gw_metadata, running.instance_id)
            labels += [label for label, _ in gateway_rows]
            calls += [make(as_caller, via) for _, make in gateway_rows]
        samples = _measure_interleaved([*calls, baseline])
    load_after = os.getloadavg()

    rows: list[dict[str, Any]] = [
        {
            "target": label,
            "transport": "gRPC TCP loopback" if label.startswith("gateway") else "gRPC unix socket",
            **latency_summary(s),
        }
        for label, s in zip(labels, samples, strict=False)
    ]
    rows.append(
        {
            "target": "fastapi execD POST /exec (sh -c)",
            "transport": "HTTP/1.1 TCP loopback keep-alive",
            **latency_summary(samples[-1]),
        }
    )
    by = {row["target"]: row for row in rows}
    base = rows[-1]

    def ratio(label: str, key: str) -> float:
        return round(base[key] / by[label][key], 2)

    ratios = {
        "baseline_over_run_sh_p50": ratio("RunProcess argv [sh -c 'echo hi']", "p50_ms"),
        "baseline_over_run_sh_p99": ratio("RunProcess argv [sh -c 'echo hi']", "p99_ms"),
        "baseline_over_run_argv_p50": ratio("RunProcess argv [echo hi]", "p50_ms"),
        "baseline_over_start_sh_p50": ratio("StartProcess argv [sh -c 'echo hi']", "p50_ms"),
        "baseline_over_start_sh_p99": ratio("StartProcess argv [sh -c 'echo hi']", "p99_ms"),
    }
    report(
        "agent_exec",
        rows,
        ratios=ratios,
        calls=N,
        warmup=WARMUP,
        round=ROUND,
        loadavg_before=[round(x, 2) for x in load_before],
        loadavg_after=[round(x, 2) for x in load_after],
        **({"gateway_error": gateway_error} if gateway_error else {}),
    )


if __name__ == "__main__":
    main()
