"""Many interactive shells held open through ONE gateway process, and their keystroke echo latency.

Set-up (all real processes): a redis-server (rate limits), BENCH_SHELLS_AGENTS (default 4) guest
agents (`python -m guest_agent` on unix sockets, each one "instance"), the RoutingService stand-in
(instance_svc.testing, the gateway tests' stand-in: a small gRPC server reading a routes file;
the real instance_svc would need real sandboxes per instance, which a 2-core machine cannot hold
next to 1,000 shells) and one `python -m gateway_svc`.

An asyncio client (grpc.aio, BENCH_SHELLS_CHANNELS connections to the gateway) opens
BENCH_SHELLS (default 1000) ConnectPty streams spread round-robin over the agents. Each terminal
runs `sh -c 'stty raw -echo && printf R && exec cat'`: after the R, every byte typed is echoed by
`cat` itself (a user-space process in the path, like a shell's line editor), not by the kernel.

While every stream stays open:
- idle phase: one keystroke at a time, round-robin over the shells (BENCH_SHELLS_SAMPLES
  keystrokes); echo latency = write of the byte until it comes back;
- busy phase: every shell types at BENCH_SHELLS_KEYS_PER_S keystrokes per second (random phase)
  for BENCH_SHELLS_BUSY_SECONDS; every echo is timed;
- the gateway's RSS and CPU (from /proc) while holding the shells and during each phase, with the
  CPU of the agents and of this client (all share the machine's cores).

File descriptor limits are raised to the hard limit here; the gateway and agents inherit them.
If not every shell opens, the number that did and the first errors are reported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import resource
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import grpc

from bench._launch import AgentProcess, agent
from bench._report import latency_summary, print_table, report
from bench.gateway_proxy import gateway_in_front_of
from cyberdesk_proto.v1 import process_pb2, process_pb2_grpc

SHELLS = int(os.environ.get("BENCH_SHELLS", "1000"))
AGENTS = int(os.environ.get("BENCH_SHELLS_AGENTS", "4"))
CHANNELS = int(os.environ.get("BENCH_SHELLS_CHANNELS", "10"))
SAMPLES = int(os.environ.get("BENCH_SHELLS_SAMPLES", "2000"))
KEYS_PER_S = float(os.environ.get("BENCH_SHELLS_KEYS_PER_S", "1"))
BUSY_SECONDS = float(os.environ.get("BENCH_SHELLS_BUSY_SECONDS", "20"))
OPEN_CONCURRENCY = int(os.environ.get("BENCH_SHELLS_OPEN_CONCURRENCY", "50"))
ECHO_TIMEOUT = 10.0
READY = b"R"
SHELL_ARGV = ["sh", "-c", f"stty raw -echo && printf {READY.decode()} && exec cat"]


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class ProcStats:
    """RSS and CPU time of one process, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._ticks = os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
        return -1.0

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self._ticks

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))


@dataclasses.dataclass
class Shell:
    """One open terminal: its call and the bytes read but not yet matched."""

    index: int
    call: Any  # grpc.aio.StreamStreamCall
    pending: bytearray = dataclasses.field(default_factory=bytearray)

    async def read_until(self, wanted: bytes) -> None:
        """Read output until `wanted` has arrived (keepalives skipped); consume it."""
        while wanted not in self.pending:
            reply = await self.call.read()
            if reply is grpc.aio.EOF:
                raise RuntimeError(f"shell {self.index} ended: {await self.call.code()}")
            if reply.HasField("exited"):
                raise RuntimeError(f"shell {self.index} exited")
            self.pending += reply.output
        at = self.pending.index(wanted) + len(wanted)
        del self.pending[:at]

    async def echo_ms(self, key: bytes) -> float:
        """Type one key and time its echo."""
        start = time.perf_counter()
        await self.call.write(process_pb2.ConnectPtyRequest(input=key))
        await asyncio.wait_for(self.read_until(key), ECHO_TIMEOUT)
        return (time.perf_counter() - start) * 1000


async def _open(stub: Any, instance_id: str, index: int, metadata: tuple[tuple[str, str], ...]) -> Shell:
    call = stub.ConnectPty(metadata=metadata)
    opening = process_pb2.PtyOpen(argv=SHELL_ARGV, size=process_pb2.PtySize(cols=80, rows=24))
    await call.write(process_pb2.ConnectPtyRequest(instance_id=instance_id, open=opening))
    shell = Shell(index, call)
    first = await call.read()
    if first is grpc.aio.EOF or not first.HasField("started"):
        raise RuntimeError(f"shell {index}: no started event ({await call.code()}: {await call.details()})")
    await asyncio.wait_for(shell.read_until(READY), 30)
    return shell


def _key(i: int) -> bytes:
    # Printable and never the READY marker, so a late marker cannot be taken for an echo.
    return bytes([ord("a") + i % 26])


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU use (% of one core) of the gateway, the agents together, and this client, over a phase."""

    def __init__(self, gw: ProcStats, agents: list[ProcStats]) -> None:
        self._gw, self._agents = gw, agents

    def _now(self) -> tuple[float, float, float, float]:
        return (
            time.perf_counter(),
            self._gw.cpu_seconds(),
            sum(a.cpu_seconds() for a in self._agents),
            _own_cpu_seconds(),
        )

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> dict[str, float]:
        end = self._now()
        wall = end[0] - self._start[0]
        pct = [round((end[i] - self._start[i]) / wall * 100, 1) for i in (1, 2, 3)]
        return {"gateway_cpu_pct": pct[0], "agents_cpu_pct": pct[1], "client_cpu_pct": pct[2]}


async def _run(
    gw_addr: str, metadata: tuple[tuple[str, str], ...], instances: list[str], gw: ProcStats, meter: CpuMeter
) -> dict[str, Any]:
    channels = [
        grpc.aio.insecure_channel(gw_addr, options=[("grpc.max_concurrent_streams", 1 << 20)]) for _ in range(CHANNELS)
    ]
    stubs = [process_pb2_grpc.ProcessServiceStub(ch) for ch in channels]
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)
    errors: list[str] = []

    async def open_one(i: int) -> Shell | None:
        async with gate:
            try:
                return await _open(stubs[i % CHANNELS], instances[i % len(instances)], i, metadata)
            except (grpc.aio.AioRpcError, RuntimeError, TimeoutError) as err:
                errors.append(f"shell {i}: {err}")
                return None

    rss_before = gw.rss_mib()
    cpu0 = gw.cpu_seconds()
    start = time.perf_counter()
    opened = [s for s in await asyncio.gather(*(open_one(i) for i in range(SHELLS))) if s is not None]
    open_seconds = time.perf_counter() - start
    cpu1 = gw.cpu_seconds()
    held: dict[str, Any] = {
        "shells_requested": SHELLS,
        "shells_open": len(opened),
        "open_seconds": round(open_seconds, 2),
        "gateway_cpu_s_opening": round(cpu1 - cpu0, 2),
        "gateway_rss_mib_before": rss_before,
        "gateway_rss_mib_holding": gw.rss_mib(),
        "gateway_threads": gw.threads(),
        "first_errors": errors[:5],
    }
    phases: list[dict[str, Any]] = []
    if opened:
        # Held for a few seconds idle: what holding alone costs the gateway.
        cpu_a = gw.cpu_seconds()
        await asyncio.sleep(5)
        held["gateway_cpu_pct_idle_holding"] = round((gw.cpu_seconds() - cpu_a) / 5 * 100, 1)

        for shell in opened[: min(len(opened), 50)]:  # warm-up: first echo of a sample of shells
            await shell.echo_ms(b"w")
        samples: list[float] = []
        meter.start()
        for i in range(SAMPLES):
            samples.append(await opened[i % len(opened)].echo_ms(_key(i)))
        phases.append(
            {
                "phase": f"idle: 1 keystroke at a time over {len(opened)} open shells",
                **latency_summary(samples),
                **meter.stop(),
                "gateway_rss_mib": gw.rss_mib(),
            }
        )

        busy: list[float] = []
        failures: list[str] = []
        deadline = time.perf_counter() + BUSY_SECONDS

        async def typist(shell: Shell) -> None:
            period = 1 / KEYS_PER_S
            await asyncio.sleep(random.uniform(0, period))
            n = 0
            while time.perf_counter() < deadline:
                tick = time.perf_counter()
                try:
                    busy.append(await shell.echo_ms(_key(n)))
                except (grpc.aio.AioRpcError, RuntimeError, TimeoutError) as err:
                    failures.append(f"shell {shell.index}: {err!r}")
                    return
                n += 1
                await asyncio.sleep(max(0.0, period - (time.perf_counter() - tick)))

        meter.start()
        t_a = time.perf_counter()
        await asyncio.gather(*(typist(s) for s in opened))
        elapsed = time.perf_counter() - t_a
        cpu = meter.stop()
        phases.append(
            {
                "phase": f"busy: each of {len(opened)} shells types {KEYS_PER_S:g} key/s",
                **latency_summary(busy),
                **cpu,
                "gateway_rss_mib": gw.rss_mib(),
                "keys_per_s": round(len(busy) / elapsed, 1),
                "echo_failures": len(failures),
            }
        )
        if failures:
            held["first_echo_failures"] = failures[:5]
    for shell in opened:
        shell.call.cancel()
    for channel in channels:
        await channel.close(grace=None)
    return {"held": held, "phases": phases}


@contextmanager
def _agents(count: int) -> Iterator[list[AgentProcess]]:
    with ExitStack() as stack:
        running = []
        for n in range(count):
            instance_id = f"i-shells-{n}"
            started = stack.enter_context(agent({"CYBERDESK_AGENT_INSTANCE_ID": instance_id}))
            running.append(dataclasses.replace(started, instance_id=instance_id))
        yield running


def main() -> None:
    """Run the benchmark and write bench/results/gateway_shells.json."""
    fd_limit = _raise_fd_limit()
    pids: dict[str, int] = {}
    with _agents(AGENTS) as agents, gateway_in_front_of(*agents, pids=pids) as (gw_addr, gw_meta):
        gw = ProcStats(pids["gateway"])
        meter = CpuMeter(gw, [ProcStats(a.pid) for a in agents])
        result = asyncio.run(_run(gw_addr, gw_meta, [a.instance_id for a in agents], gw, meter))
    held, phases = result["held"], result["phases"]
    print_table([{k: v for k, v in held.items() if not k.startswith("first_")}])
    for key in ("first_errors", "first_echo_failures"):
        if held.get(key):
            print(key, held[key])
    report(
        "gateway_shells",
        phases,
        held=held,
        setup={
            "agents": AGENTS,
            "client_channels": CHANNELS,
            "fd_limit": fd_limit,
            "shell_argv": SHELL_ARGV,
            "routing": "instance_svc.testing RoutingService stand-in (routes file)",
        },
        summary={
            "shells_open": held["shells_open"],
            "idle_echo_p99_ms": phases[0]["p99_ms"] if phases else None,
            "busy_echo_p99_ms": phases[1]["p99_ms"] if len(phases) > 1 else None,
            "gateway_rss_mib_holding": held["gateway_rss_mib_holding"],
        },
    )


if __name__ == "__main__":
    main()
