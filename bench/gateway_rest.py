"""The REST face's cost: the same calls over HTTP/JSON and over gRPC, both through the gateway process.

- exec `echo hi` (argv, no shell): p50/p99 of a REST `POST .../processes` (NDJSON, one keep-alive
  httpx connection) vs the gRPC StartProcess through the same gateway;
- upload (`PUT .../files/...`, a streamed body of 1 MiB pieces) and download (`GET`, raw bytes) of
  BENCH_GATEWAY_REST_MIB (default 256) MiB, sha256 checked, MB/s over REST vs gRPC.

Behind the gateway: the same set-up as bench/gateway_proxy.py (a real guest agent, a real
redis-server, the routing stand-in of the gateway tests), reused from there. Run on the host, not
in a sandbox, so the agent's own costs are the same for both faces.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx

from bench import gateway_proxy
from bench._launch import agent, free_port
from bench._report import latency_summary, print_table, report
from bench.agent_files import chunks

N = int(os.environ.get("BENCH_N", "300"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "30"))
MIB = 1024 * 1024
TOTAL = int(os.environ.get("BENCH_GATEWAY_REST_MIB", "256")) * MIB


def _measure(call: Callable[[], None]) -> list[float]:
    for _ in range(WARMUP):
        call()
    samples = []
    for _ in range(N):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def _rest_exec(client: httpx.Client, instance_id: str) -> Callable[[], None]:
    def call() -> None:
        r = client.post(f"/v1/instances/{instance_id}/processes", json={"argv": ["echo", "hi"]})
        events = [json.loads(line)["result"]["event"] for line in r.text.splitlines()]
        if r.status_code != 200 or events[1].get("stdout") != "aGkK" or "exited" not in events[-1]:
            raise RuntimeError(f"unexpected answer {r.status_code} {r.text[:300]}")

    return call


def _rest_transfer(client: httpx.Client, instance_id: str, path: str, expected: str) -> list[dict[str, Any]]:
    url = f"/v1/instances/{instance_id}/files{path}"

    def body() -> Iterator[bytes]:
        yield from chunks(TOTAL, MIB)

    start = time.perf_counter()
    r = client.put(url, params={"overwrite": "true"}, content=body(), timeout=900)
    up = time.perf_counter() - start
    if r.status_code != 200:
        raise RuntimeError(f"upload failed: {r.status_code} {r.text[:300]}")
    digest = hashlib.sha256()
    received = 0
    start = time.perf_counter()
    with client.stream("GET", url, timeout=900) as s:
        for piece in s.iter_raw():
            digest.update(piece)
            received += len(piece)
    down = time.perf_counter() - start
    row = {"target": "REST via gateway", "MiB": TOTAL // MIB}
    return [
        {
            **row,
            "direction": "upload",
            "seconds": round(up, 3),
            "MB_s": round(TOTAL / up / 1e6, 1),
            "sha256_ok": r.json()["sha256"] == expected,
        },
        {
            **row,
            "direction": "download",
            "seconds": round(down, 3),
            "MB_s": round(TOTAL / down / 1e6, 1),
            "sha256_ok": digest.hexdigest() == expected and received == TOTAL,
        },
    ]


def main() -> None:
    """Run the benchmark and write bench/results/gateway_rest.json."""
    digest = hashlib.sha256()
    for piece in chunks(TOTAL, MIB):
        digest.update(piece)
    expected = digest.hexdigest()
    http_addr = f"127.0.0.1:{free_port()}"
    # gateway_proxy starts the gateway with os.environ underneath its own settings.
    os.environ["CYBERDESK_GATEWAY_HTTP_ADDR"] = http_addr
    gateway_proxy.TOTAL = TOTAL  # its gRPC transfer helper, on the same amount of data
    exec_rows: list[dict[str, Any]] = []
    file_rows: list[dict[str, Any]] = []
    with agent() as running, gateway_proxy.gateway_in_front_of(running) as (gw_addr, gw_meta):
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"http://{http_addr}/openapi.json", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        path = str(running.workdir / "bench-rest.bin")
        headers = {gw_meta[0][0]: gw_meta[0][1]}
        with (
            grpc.insecure_channel(gw_addr) as via,
            httpx.Client(base_url=f"http://{http_addr}", headers=headers, timeout=60) as client,
        ):
            exec_rows.append(
                {
                    "target": "gRPC via gateway",
                    **latency_summary(_measure(gateway_proxy._exec(via, running.instance_id, gw_meta))),
                }
            )
            exec_rows.append(
                {"target": "REST via gateway", **latency_summary(_measure(_rest_exec(client, running.instance_id)))}
            )
            file_rows += gateway_proxy._transfer(via, running.instance_id, gw_meta, path, expected, "gRPC via gateway")
            file_rows += _rest_transfer(client, running.instance_id, path, expected)
        os.unlink(path)
    grpc_ex, rest_ex = exec_rows
    summary = {
        "rest_exec_added_p50_ms": round(rest_ex["p50_ms"] - grpc_ex["p50_ms"], 3),
        "rest_exec_added_p99_ms": round(rest_ex["p99_ms"] - grpc_ex["p99_ms"], 3),
        "rest_upload_MB_s": file_rows[2]["MB_s"],
        "rest_download_MB_s": file_rows[3]["MB_s"],
        "upload_ratio_rest_vs_grpc": round(file_rows[2]["MB_s"] / file_rows[0]["MB_s"], 3),
        "download_ratio_rest_vs_grpc": round(file_rows[3]["MB_s"] / file_rows[1]["MB_s"], 3),
    }
    print_table(file_rows)
    report("gateway_rest", exec_rows, transfers=file_rows, summary=summary, calls=N)


if __name__ == "__main__":
    main()
