"""Bulk terminal output: `seq 1 3000000` in a shell, read as fast as the client can.

Set-up (all real processes): one guest agent (`python -m guest_agent` on a unix socket) and, in
front of it, a gateway with its redis-server and the routing stand-in (bench.gateway_proxy).
Each run opens a terminal (`bash --norc -i`), types
`echo BEGIN-$((1+1)); seq 1 3000000; echo END-$((2+2))` and times from the BEGIN marker to the
END marker; the bytes between them are checked against the expected 23.9 MB (every line, \\r\\n).
Paths, interleaved run by run (BENCH_SHELL_OUTPUT_RUNS each, default 3):
- agent: a grpc client straight to the agent's ConnectPty;
- gateway: the same client through the gateway;
- gateway, SDK: `cyberdesk.Cyberdesk(...).instances.handle(id).shell()` through the gateway.

Reported per path: MB/s (p50, min, max over the runs) and the agent's RSS after the runs: a
terminal is paced to its reader, so neither the agent nor the gateway holds the output.
"""

from __future__ import annotations

import os
import queue
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from bench._launch import agent
from bench._report import report
from bench.gateway_proxy import gateway_in_front_of
from cyberdesk import Cyberdesk
from cyberdesk_proto.v1 import process_pb2, process_pb2_grpc

RUNS = int(os.environ.get("BENCH_SHELL_OUTPUT_RUNS", "3"))
LINES = 3_000_000
COMMAND = f"echo BEGIN-$((1+1)); seq 1 {LINES}; echo END-$((2+2))\n"
BEGIN, END = b"BEGIN-2\r\n", b"END-4\r\n"
NEWLINE = b"\n"
EXPECTED = b"".join(b"%d\r\n" % n for n in range(1, LINES + 1))


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return -1.0


def _timed(chunks: Iterator[bytes]) -> tuple[float, int]:
    """Seconds from the BEGIN marker to the END marker, and the bytes between them (checked)."""
    output = bytearray()
    began = 0.0
    scan = 0
    for chunk in chunks:
        output += chunk
        if not began and BEGIN in output[max(0, scan - len(BEGIN)) :]:
            began = time.perf_counter()
        if began and END in output[max(0, scan - len(END)) :]:
            elapsed = time.perf_counter() - began
            start = output.index(BEGIN) + len(BEGIN)
            body = bytes(output[start : output.index(END, start)])
            if body != EXPECTED:
                raise RuntimeError(f"{body.count(NEWLINE)} lines instead of {LINES}")
            return elapsed, len(body)
        scan = len(output)
    raise RuntimeError("the terminal ended before the END marker")


def _grpc_run(target: str, metadata: tuple[tuple[str, str], ...], instance_id: str) -> tuple[float, int]:
    requests: queue.Queue[process_pb2.ConnectPtyRequest | None] = queue.Queue()
    opening = process_pb2.PtyOpen(argv=["bash", "--norc", "-i"])
    requests.put(process_pb2.ConnectPtyRequest(instance_id=instance_id, open=opening))
    with grpc.insecure_channel(target) as channel:
        call = process_pb2_grpc.ProcessServiceStub(channel).ConnectPty(iter(requests.get, None), metadata=metadata)

        def chunks() -> Iterator[bytes]:
            for reply in call:
                if reply.HasField("started"):
                    requests.put(process_pb2.ConnectPtyRequest(input=COMMAND.encode()))
                yield reply.output

        try:
            return _timed(chunks())
        finally:
            requests.put(None)
            call.cancel()


def _sdk_run(target: str, key: str, instance_id: str) -> tuple[float, int]:
    with Cyberdesk(api_key=key, endpoint=target) as client:
        shell = client.instances.handle(instance_id).shell(argv=["bash", "--norc", "-i"])
        try:
            shell.send(COMMAND)
            return _timed(iter(shell))
        finally:
            shell.close()


def main() -> None:
    """Run the benchmark and write bench/results/gateway_shell_output.json."""
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    with agent() as running, gateway_in_front_of(running) as (gw_addr, gw_meta):
        key = gw_meta[0][1].removeprefix("Bearer ")
        paths: dict[str, Callable[[], tuple[float, int]]] = {
            "agent": lambda: _grpc_run(running.target, running.metadata, running.instance_id),
            "gateway": lambda: _grpc_run(gw_addr, gw_meta, running.instance_id),
            "gateway, SDK shell": lambda: _sdk_run(gw_addr, key, running.instance_id),
        }
        rates: dict[str, list[float]] = {name: [] for name in paths}
        size = 0
        for _ in range(RUNS):
            for name, run in paths.items():
                seconds, size = run()
                rates[name].append(size / seconds / 1e6)
        agent_rss = _rss_mib(running.pid)
    rows: list[dict[str, Any]] = [
        {
            "path": name,
            "runs": len(values),
            "MB_per_s_p50": round(statistics.median(values), 1),
            "MB_per_s_min": round(min(values), 1),
            "MB_per_s_max": round(max(values), 1),
        }
        for name, values in rates.items()
    ]
    report(
        "gateway_shell_output",
        rows,
        setup={"command": COMMAND.strip(), "bytes_between_markers": size, "runs_interleaved": RUNS},
        agent_rss_mib_after=agent_rss,
        load_average_1m={"before": round(load_before, 1), "after": round(os.getloadavg()[0], 1)},
    )


if __name__ == "__main__":
    main()
