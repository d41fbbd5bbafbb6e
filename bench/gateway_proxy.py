"""The gateway's cost: the same calls through gateway_svc and straight to a real guest agent.

- the SDK's `exec()` through the gateway (unary RunProcess since the SDK chose it for whole
  results) against `exec_stream()` (the StartProcess stream `exec()` used before), interleaved;
- exec `echo hi` (argv, no shell): p50/p99 through the gateway vs the agent directly, both as
  StartProcess (server stream) and as RunProcess (unary, output at once), with the gateway's CPU
  time per call (from /proc: a figure a busy shared machine disturbs less than latency);
- upload and download of BENCH_GATEWAY_MIB (default 1024) MiB in 1 MiB chunks, sha256 checked,
  MB/s through the gateway vs directly;
- unary GetInstance calls per second through the gateway with auth and rate limiting on (one
  channel, BENCH_GATEWAY_CONCURRENCY calls in flight);
- RunProcess against StartProcess, interleaved, straight to the agent, through a do-nothing
  grpc.aio proxy (bench/_bare_proxy.py) and through the gateway: how much of the unary path's
  advantage is the hop's own (each extra stream message costs each hop), and how much is left.

Behind the gateway: a real guest agent (bench._launch.agent), a real redis-server (rate limits),
and, for routing and GetInstance, the RoutingService/InstanceService stand-in of the gateway
tests (instance_svc.testing): a small real gRPC server reading a routes file. So the
GetInstance rate measures the gateway plus that stand-in, not instance_svc's own store.
1,000 concurrent shells with keystroke echo: bench/gateway_shells.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc

from bench._launch import AgentProcess, agent, free_port
from bench._report import latency_summary, print_table, report
from bench.agent_files import chunks
from cyberdesk._requests import upload_trailer
from cyberdesk_proto.v1 import filesystem_pb2 as fs
from cyberdesk_proto.v1 import filesystem_pb2_grpc, instance_pb2, instance_pb2_grpc, process_pb2, process_pb2_grpc
from cyberdesk_stack.processes import redis_server, spawn, stop, wait_healthy
from gateway_svc.keystore import create_key

N = int(os.environ.get("BENCH_N", "300"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "30"))
MIB = 1024 * 1024
TOTAL = int(os.environ.get("BENCH_GATEWAY_MIB", "1024")) * MIB
CONCURRENCY = int(os.environ.get("BENCH_GATEWAY_CONCURRENCY", "16"))
UNARY_SECONDS = float(os.environ.get("BENCH_GATEWAY_UNARY_SECONDS", "5"))
INTERNAL_TOKEN = "bench-internal-" + "x" * 32
TENANT = "bench-tenant"


@contextmanager
def _process(
    args: list[str], env: dict[str, str], log: Path, health: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = spawn(args, env, log)
    try:
        if health:
            wait_healthy(health, timeout=20, proc=proc)
        yield proc
    finally:
        stop(proc)


@contextmanager
def gateway_in_front_of(
    running: AgentProcess, *more: AgentProcess, pids: dict[str, int] | None = None, http_addr: str = ""
) -> Iterator[tuple[str, tuple[tuple[str, str], ...]]]:
    """A gateway (with redis and the routing stand-in) routing each agent's `instance_id` to it.

    `pids`, when given, receives the gateway's process id under "gateway" (for RSS and CPU readings).
    `http_addr` is where its HTTP face listens (default: a free port; bench/preview_proxy.py names one).
    """
    with tempfile.TemporaryDirectory(prefix="cyberdesk-bench-gw-") as tmp, ExitStack() as stack:
        base = Path(tmp)
        redis_url = stack.enter_context(redis_server(base))
        routes = base / "routes.json"
        routes.write_text(
            json.dumps(
                {
                    a.instance_id: {
                        "tenant": TENANT,
                        "state": "RUNNING",
                        "target": a.target,
                        "token": a.metadata[0][1].removeprefix("Bearer "),
                    }
                    for a in (running, *more)
                }
            )
        )
        instance_addr = f"127.0.0.1:{free_port()}"
        stack.enter_context(
            _process(
                [sys.executable, "-m", "instance_svc.testing"],
                {
                    "UPSTREAM_ADDR": instance_addr,
                    "UPSTREAM_ROUTES": str(routes),
                    "CYBERDESK_INTERNAL_TOKEN": INTERNAL_TOKEN,
                    "CYBERDESK_LOG_LEVEL": "WARNING",
                },
                base / "instance.log",
                instance_addr,
            )
        )
        state = base / "state"
        env = {
            "CYBERDESK_STATE_DIR": str(state),
            "CYBERDESK_INTERNAL_TOKEN": INTERNAL_TOKEN,
            "CYBERDESK_INSTANCE_ADDR": instance_addr,
            "CYBERDESK_REDIS_URL": redis_url,
            "CYBERDESK_RATE_LIMIT": "1000000/1s",
            "CYBERDESK_LOG_LEVEL": "WARNING",
        }
        _record, secret = create_key(state, TENANT, "bench")
        gw_addr = f"127.0.0.1:{free_port()}"
        gateway = stack.enter_context(
            _process(
                [sys.executable, "-m", "gateway_svc"],
                # A free port for the REST face too: the default 8080 may be taken on a shared machine.
                {
                    **env,
                    "CYBERDESK_GATEWAY_ADDR": gw_addr,
                    "CYBERDESK_GATEWAY_HTTP_ADDR": http_addr or f"127.0.0.1:{free_port()}",
                },
                base / "gateway.log",
                gw_addr,
            )
        )
        if pids is not None:
            pids["gateway"] = gateway.pid
        yield gw_addr, (("authorization", f"Bearer {secret}"),)


def _measure(call: Callable[[], None]) -> list[float]:
    for _ in range(WARMUP):
        call()
    samples = []
    for _ in range(N):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def _run_process(channel: grpc.Channel, instance_id: str, metadata: tuple[tuple[str, str], ...]) -> Callable[[], None]:
    stub = process_pb2_grpc.ProcessServiceStub(channel)
    request = process_pb2.RunProcessRequest(instance_id=instance_id, argv=["echo", "hi"])

    def call() -> None:
        reply = stub.RunProcess(request, metadata=metadata, timeout=30)
        if reply.stdout != b"hi\n" or reply.exited.exit_code != 0:
            raise RuntimeError(f"unexpected reply {reply!r}")

    return call


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _exec(channel: grpc.Channel, instance_id: str, metadata: tuple[tuple[str, str], ...]) -> Callable[[], None]:
    stub = process_pb2_grpc.ProcessServiceStub(channel)
    request = process_pb2.StartProcessRequest(instance_id=instance_id, argv=["echo", "hi"])

    def call() -> None:
        out = b"".join(m.event.stdout for m in stub.StartProcess(request, metadata=metadata, timeout=30))
        if out != b"hi\n":
            raise RuntimeError(f"unexpected output {out!r}")

    return call


def _sdk_exec_rows(gw_addr: str, instance_id: str, metadata: tuple[tuple[str, str], ...]) -> list[dict[str, Any]]:
    """The SDK's `exec()` (unary RunProcess) against the streaming path it took before, interleaved.

    Both through the gateway, `echo hi` as argv, calls alternating so that a change of load on
    the shared machine falls on both rows alike.
    """
    from cyberdesk import Cyberdesk, Exited, Stdout

    key = metadata[0][1].removeprefix("Bearer ")
    with Cyberdesk(api_key=key, endpoint=gw_addr) as client:
        box = client.instances.get(instance_id)

        def whole() -> None:
            result = box.exec(["echo", "hi"])
            if result.stdout != b"hi\n" or result.exit_code != 0:
                raise RuntimeError(f"unexpected result {result!r}")

        def streamed() -> None:
            out, code = b"", None
            for event in box.exec_stream(["echo", "hi"]):
                if isinstance(event, Stdout):
                    out += event.data
                elif isinstance(event, Exited):
                    code = event.exit_code
            if out != b"hi\n" or code != 0:
                raise RuntimeError(f"unexpected result {out!r} {code}")

        for _ in range(WARMUP):
            whole()
            streamed()
        samples: tuple[list[float], list[float]] = ([], [])
        for _ in range(N):
            for call, out in ((whole, samples[0]), (streamed, samples[1])):
                start = time.perf_counter()
                call()
                out.append((time.perf_counter() - start) * 1000)
    return [
        {"rpc": "SDK exec() = RunProcess", "target": "through gateway", **latency_summary(samples[0])},
        {"rpc": "SDK exec_stream() = StartProcess", "target": "through gateway", **latency_summary(samples[1])},
    ]


def _ceiling_rows(running: AgentProcess, gw_addr: str, gw_meta: tuple[tuple[str, str], ...]) -> list[dict[str, Any]]:
    """RunProcess against StartProcess (`echo hi`, interleaved) straight to the agent, through a do-nothing
    proxy (bench/_bare_proxy.py) and through the gateway: how much of the unary path's advantage
    any gRPC hop leaves, and how much of it the gateway's own work keeps."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="cdb-bare-") as tmp:
        bare = spawn(
            [sys.executable, "-m", "bench._bare_proxy", f"127.0.0.1:{port}", running.target], {}, Path(tmp) / "bare.log"
        )
        try:
            targets = [
                ("agent directly", running.target, running.metadata),
                ("do-nothing grpc.aio proxy", f"127.0.0.1:{port}", running.metadata),
                ("through gateway", gw_addr, gw_meta),
            ]
            with ExitStack() as channels:
                calls = []
                for name, addr, md in targets:
                    channel = channels.enter_context(grpc.insecure_channel(addr))
                    grpc.channel_ready_future(channel).result(timeout=20)
                    calls += [(name, "RunProcess", _run_process(channel, running.instance_id, md))]
                    calls += [(name, "StartProcess", _exec(channel, running.instance_id, md))]
                for _ in range(WARMUP):
                    for _, _, call in calls:
                        call()
                samples: dict[tuple[str, str], list[float]] = {(t, r): [] for t, r, _ in calls}
                for _ in range(N):
                    for target, rpc, call in calls:
                        start = time.perf_counter()
                        call()
                        samples[(target, rpc)].append((time.perf_counter() - start) * 1000)
        finally:
            stop(bare)
    rows = []
    for name, _, _ in targets:
        run, streamed = latency_summary(samples[(name, "RunProcess")]), latency_summary(samples[(name, "StartProcess")])
        rows.append(
            {
                "target": name,
                "RunProcess_p50_ms": run["p50_ms"],
                "StartProcess_p50_ms": streamed["p50_ms"],
                "unary_less_time": round(1 - run["p50_ms"] / streamed["p50_ms"], 3),
            }
        )
    return rows


def _transfer(
    channel: grpc.Channel,
    instance_id: str,
    metadata: tuple[tuple[str, str], ...],
    path: str,
    expected: str,
    target: str,
    gateway_pid: int | None = None,
) -> list[dict[str, Any]]:
    """Upload then download TOTAL bytes; with `gateway_pid`, the gateway's CPU seconds for each."""
    stub = filesystem_pb2_grpc.FilesystemServiceStub(channel)

    def cpu() -> float:
        return _cpu_seconds(gateway_pid) if gateway_pid is not None else 0.0

    def requests() -> Iterator[fs.UploadFileRequest]:
        yield fs.UploadFileRequest(instance_id=instance_id, header=fs.UploadFileHeader(path=path, overwrite=True))
        for piece in chunks(TOTAL, MIB):
            yield fs.UploadFileRequest(chunk=piece)
        # The agent commits only on the trailer; `expected` is the sha256 of these chunks.
        yield upload_trailer(TOTAL, expected)

    cpu0 = cpu()
    start = time.perf_counter()
    reply = stub.UploadFile(requests(), metadata=metadata, timeout=900)
    up = time.perf_counter() - start
    cpu1 = cpu()
    digest = hashlib.sha256()
    received = 0
    start = time.perf_counter()
    for message in stub.DownloadFile(
        fs.DownloadFileRequest(instance_id=instance_id, path=path), metadata=metadata, timeout=900
    ):
        digest.update(message.chunk)
        received += len(message.chunk)
    down = time.perf_counter() - start
    cpu2 = cpu()
    gateway_cpu = [round(cpu1 - cpu0, 2), round(cpu2 - cpu1, 2)] if gateway_pid is not None else [None, None]
    return [
        {
            "target": target,
            "direction": "upload",
            "MiB": TOTAL // MIB,
            "seconds": round(up, 3),
            "MB_s": round(TOTAL / up / 1e6, 1),
            "sha256_ok": reply.sha256 == expected,
            "gateway_cpu_s": gateway_cpu[0],
        },
        {
            "target": target,
            "direction": "download",
            "MiB": TOTAL // MIB,
            "seconds": round(down, 3),
            "MB_s": round(TOTAL / down / 1e6, 1),
            "sha256_ok": digest.hexdigest() == expected and received == TOTAL,
            "gateway_cpu_s": gateway_cpu[1],
        },
    ]


async def _unary_rate(addr: str, instance_id: str, metadata: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = instance_pb2_grpc.InstanceServiceStub(channel)
        request = instance_pb2.GetInstanceRequest(instance_id=instance_id)
        for _ in range(WARMUP):
            await stub.GetInstance(request, metadata=metadata, timeout=10)
        done = 0
        stop = time.perf_counter() + UNARY_SECONDS

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await stub.GetInstance(request, metadata=metadata, timeout=10)
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - start
    return {
        "calls": done,
        "seconds": round(elapsed, 3),
        "calls_per_s": round(done / elapsed, 1),
        "in_flight": CONCURRENCY,
    }


def main() -> None:
    """Run the benchmark and write bench/results/gateway_proxy.json."""
    expected = hashlib.sha256(b"".join(chunks(TOTAL, MIB))).hexdigest() if TOTAL <= 64 * MIB else None
    if expected is None:
        digest = hashlib.sha256()
        for piece in chunks(TOTAL, MIB):
            digest.update(piece)
        expected = digest.hexdigest()
    exec_rows: list[dict[str, Any]] = []
    file_rows: list[dict[str, Any]] = []
    pids: dict[str, int] = {}
    load_before = os.getloadavg()  # the machine is shared: say how busy it was
    with agent() as running, gateway_in_front_of(running, pids=pids) as (gw_addr, gw_meta):
        path = str(running.workdir / "bench.bin")
        with grpc.insecure_channel(running.target) as direct, grpc.insecure_channel(gw_addr) as via:
            for rpc, make in (("StartProcess", _exec), ("RunProcess", _run_process)):
                exec_rows.append(
                    {
                        "rpc": rpc,
                        "target": "agent directly",
                        **latency_summary(_measure(make(direct, running.instance_id, running.metadata))),
                        "gateway_cpu_us_per_call": None,
                    }
                )
                cpu = _cpu_seconds(pids["gateway"])
                samples = _measure(make(via, running.instance_id, gw_meta))
                cpu_us = (_cpu_seconds(pids["gateway"]) - cpu) / (N + WARMUP) * 1e6
                exec_rows.append(
                    {
                        "rpc": rpc,
                        "target": "through gateway",
                        **latency_summary(samples),
                        "gateway_cpu_us_per_call": round(cpu_us),
                    }
                )
            sdk_rows = _sdk_exec_rows(gw_addr, running.instance_id, gw_meta)
            ceiling = _ceiling_rows(running, gw_addr, gw_meta)
            file_rows += _transfer(direct, running.instance_id, running.metadata, path, expected, "agent directly")
            file_rows += _transfer(
                via, running.instance_id, gw_meta, path, expected, "through gateway", pids["gateway"]
            )
        os.unlink(path)
        unary = asyncio.run(_unary_rate(gw_addr, running.instance_id, gw_meta))
    load_after = os.getloadavg()
    direct_ex, via_ex, direct_run, via_run = exec_rows
    sdk_whole, sdk_streamed = sdk_rows
    exec_rows += sdk_rows
    summary = {
        "sdk_exec_p50_ms": sdk_whole["p50_ms"],
        "sdk_exec_stream_p50_ms": sdk_streamed["p50_ms"],
        # How much faster exec() is now than the streaming path exec() used to take.
        "sdk_exec_p50_faster_than_streaming": round(1 - sdk_whole["p50_ms"] / sdk_streamed["p50_ms"], 3),
        "exec_added_p50_ms": round(via_ex["p50_ms"] - direct_ex["p50_ms"], 3),
        "exec_added_p99_ms": round(via_ex["p99_ms"] - direct_ex["p99_ms"], 3),
        "run_process_via_gateway_p50_ms": via_run["p50_ms"],
        "run_process_via_gateway_p99_ms": via_run["p99_ms"],
        "run_process_added_p50_ms": round(via_run["p50_ms"] - direct_run["p50_ms"], 3),
        "upload_ratio": round(file_rows[2]["MB_s"] / file_rows[0]["MB_s"], 3),
        "download_ratio": round(file_rows[3]["MB_s"] / file_rows[1]["MB_s"], 3),
        "get_instance_calls_per_s": unary["calls_per_s"],
    }
    print_table(file_rows)
    print_table([{"target": "GetInstance via gateway", **unary}])
    print_table(ceiling)
    report(
        "gateway_proxy",
        exec_rows,
        transfers=file_rows,
        unary=unary,
        unary_vs_streaming_by_hop=ceiling,
        summary=summary,
        calls=N,
        loadavg_before=[round(x, 2) for x in load_before],
        loadavg_after=[round(x, 2) for x in load_after],
    )


if __name__ == "__main__":
    main()
