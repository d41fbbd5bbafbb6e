"""The TypeScript SDK against the Python SDK: exec latency and transfer throughput, one stack, interleaved.

- exec `echo hi` (argv): `box.exec()` of each SDK, BENCH_N calls in rounds of BENCH_ROUND, the
  two SDKs taking turns (and the order swapped every round), so a loaded shared machine disturbs
  both alike. Both are one RunProcess call: the Python SDK's over gRPC, the TypeScript SDK's over
  the REST face (`POST .../processes:run`, fetch with keep-alive), through the same gateway;
- upload and download of BENCH_TS_MIB (default 256) MiB from and to a local file
  (`files.upload`/`download` in Python, `files.uploadFile`/`downloadFile` in TypeScript), sha256
  checked against the local file, interleaved the same way, BENCH_TS_TRANSFERS rounds.

The stack is `cyberdesk up` on free ports (a real gateway, instance_svc, Redis and a bubblewrap
sandbox); the TypeScript side is one long-lived Node process (sdk/typescript/bench/sdk_bench.ts)
driven over stdin/stdout, so Node's start-up is not measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench._launch import ROOT, free_port
from bench._report import latency_summary, print_table, report

N = int(os.environ.get("BENCH_N", "300"))
ROUND = int(os.environ.get("BENCH_ROUND", "50"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "30"))
MIB = 1024 * 1024
TOTAL = int(os.environ.get("BENCH_TS_MIB", "256")) * MIB
TRANSFERS = int(os.environ.get("BENCH_TS_TRANSFERS", "2"))
SDK = ROOT / "sdk" / "typescript"
CLI = str(ROOT / ".venv" / "bin" / "cyberdesk")
PY, TS = "Python (gRPC)", "TypeScript (REST)"


@contextmanager
def _stack(tmp: Path) -> Iterator[dict[str, str]]:
    """`cyberdesk up` on free ports; yields the CLI config it wrote (endpoints and key)."""
    config = tmp / "config.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYBERDESK_")}
    env.update({"CYBERDESK_CONFIG": str(config), "CYBERDESK_WARM_POOL": "base=1,desktop=0"})
    argv = [
        CLI, "up", "--state-dir", str(tmp / "state"),
        "--gateway-addr", f"127.0.0.1:{free_port()}", "--http-addr", f"127.0.0.1:{free_port()}",
        "--instance-addr", f"127.0.0.1:{free_port()}", "--billing-addr", f"127.0.0.1:{free_port()}",
        "--redis-port", str(free_port()),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = b""
    try:
        deadline = time.monotonic() + 120
        while b"Try: cyberdesk create" not in output:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cyberdesk up did not start:\n{output.decode(errors='replace')}")
            if select.select([proc.stdout], [], [], 0.5)[0]:
                output += os.read(proc.stdout.fileno(), 65536)
        yield json.loads(config.read_text())
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()


class _Node:
    """The TypeScript bench process: one JSON request per line, one JSON answer per line."""

    def __init__(self, config: dict[str, str]) -> None:
        env = {**os.environ, "CYBERDESK_API_KEY": config["api_key"], "CYBERDESK_HTTP_ENDPOINT": config["http_endpoint"]}
        self.proc = subprocess.Popen(
            ["node", str(SDK / "dist" / "bench" / "sdk_bench.js")],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self.proc.stdout.readline())
        if "error" in answer:
            raise RuntimeError(f"TypeScript side: {answer['error']}")
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


def _python_exec(box: Any, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        result = box.exec(["echo", "hi"])
        samples.append((time.perf_counter() - start) * 1000)
        if result.stdout != b"hi\n":
            raise RuntimeError(f"unexpected output {result.stdout!r}")
    return samples


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> None:
    """Run the benchmark and write bench/results/typescript_sdk.json."""
    subprocess.run([str(SDK / "node_modules" / ".bin" / "tsc"), "-p", "tsconfig.json"], cwd=SDK, check=True)
    # The machine is shared: its load is part of the result (interleaving spreads it over both SDKs).
    load_before = os.getloadavg()
    from cyberdesk import Cyberdesk

    with tempfile.TemporaryDirectory(prefix="bench-ts-") as tmp_name, _stack(Path(tmp_name)) as config:
        tmp = Path(tmp_name)
        local = tmp / "data.bin"
        with local.open("wb") as out:
            for _ in range(TOTAL // MIB):
                out.write(os.urandom(MIB))
        expected = _sha256(local)
        node = _Node(config)
        with Cyberdesk(api_key=config["api_key"], endpoint=config["endpoint"]) as client:
            box = client.instances.create(timeout=1800)
            try:
                _python_exec(box, WARMUP)
                node.ask(op="exec", instance=box.id, n=WARMUP)
                py: list[float] = []
                ts: list[float] = []
                for turn in range(max(1, N // ROUND)):
                    first_ts = turn % 2 == 1
                    if first_ts:
                        ts += node.ask(op="exec", instance=box.id, n=ROUND)["samples"]
                    py += _python_exec(box, ROUND)
                    if not first_ts:
                        ts += node.ask(op="exec", instance=box.id, n=ROUND)["samples"]
                exec_rows: list[dict[str, Any]] = [
                    {"sdk": "Python (gRPC)", "call": "exec(['echo', 'hi'])", **latency_summary(py)},
                    {"sdk": "TypeScript (REST)", "call": "exec(['echo', 'hi'])", **latency_summary(ts)},
                ]
                transfers: dict[tuple[str, str], list[float]] = {}
                checked = True
                for turn in range(TRANSFERS):
                    for sdk in (
                        ("TypeScript (REST)", "Python (gRPC)") if turn % 2 else ("Python (gRPC)", "TypeScript (REST)")
                    ):
                        remote = f"/tmp/bench-{turn}.bin"
                        back = tmp / "back.bin"
                        if sdk.startswith("Python"):
                            start = time.perf_counter()
                            up = box.files.upload(str(local), remote)
                            up_s = time.perf_counter() - start
                            start = time.perf_counter()
                            box.files.download(remote, str(back))
                            down_s = time.perf_counter() - start
                            checked &= up.sha256 == expected
                        else:
                            answer = node.ask(op="upload", instance=box.id, local=str(local), remote=remote)
                            up_s = answer["seconds"]
                            checked &= answer["sha256"] == expected
                            answer = node.ask(op="download", instance=box.id, local=str(back), remote=remote)
                            down_s = answer["seconds"]
                            checked &= answer["sha256"] == expected
                        checked &= _sha256(back) == expected
                        back.unlink()
                        box.files.remove(remote)
                        transfers.setdefault((sdk, "upload"), []).append(up_s)
                        transfers.setdefault((sdk, "download"), []).append(down_s)
            finally:
                box.delete()
                node.close()
    transfer_rows: list[dict[str, Any]] = [
        {
            "sdk": sdk,
            "direction": direction,
            "MiB": TOTAL // MIB,
            "runs": len(seconds),
            "best_seconds": round(min(seconds), 3),
            "best_MB_s": round(TOTAL / min(seconds) / 1e6, 1),
            "worst_MB_s": round(TOTAL / max(seconds) / 1e6, 1),
            "sha256_ok": checked,
        }
        for (sdk, direction), seconds in transfers.items()
    ]
    py_row, ts_row = exec_rows
    by = {(r["sdk"], r["direction"]): r["best_MB_s"] for r in transfer_rows}
    summary = {
        "exec_p50_ms": {"python": py_row["p50_ms"], "typescript": ts_row["p50_ms"]},
        "exec_p99_ms": {"python": py_row["p99_ms"], "typescript": ts_row["p99_ms"]},
        "ts_exec_p50_vs_python": round(ts_row["p50_ms"] / py_row["p50_ms"], 3),
        "upload_ratio_ts_vs_python": round(by[("TypeScript (REST)", "upload")] / by[("Python (gRPC)", "upload")], 3),
        "download_ratio_ts_vs_python": round(
            by[("TypeScript (REST)", "download")] / by[("Python (gRPC)", "download")], 3
        ),
        "node": subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip(),
        "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    print_table(transfer_rows)
    report("typescript_sdk", exec_rows, transfers=transfer_rows, summary=summary, calls=len(py))


if __name__ == "__main__":
    main()
