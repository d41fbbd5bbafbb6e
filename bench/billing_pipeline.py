"""Billing pipeline: lifecycle events through billing_svc into the ledger and out to the Stripe stand-in.

`python -m bench billing_pipeline` (BENCH_INSTANCES, default 400, and BENCH_LAG_N to size it;
BENCH_LOG_LEVEL=DEBUG logs each outbox pass of billing_svc, BENCH_KEEP=1 keeps its directory,
BENCH_STRIPE_CONCURRENCY overrides billing_svc's CYBERDESK_STRIPE_CONCURRENCY default). Real processes: a
redis-server, billing_svc (`python -m billing_svc`, its SQLite ledger, the real stripe library),
and the Stripe stand-in as a process of its own (`python -m billing_svc.stripe_standin`), so the
stand-in's work is not charged to billing_svc or to this process.

1. Throughput: BENCH_INSTANCES instances' whole lives (PENDING, STARTING, RUNNING, PAUSED,
   RUNNING, STOPPING, TERMINATED; 5 meters; times in the recent past) are written to the event
   stream at once, as instance_svc's publisher writes them. Measured: lifecycle events per
   second into the ledger (until billing_svc's GetUsage shows every instance ended) and meter
   events per second accepted by the stand-in (until it holds every window's event), from the
   first XADD. Windows of 1 s (CYBERDESK_BILLING_WINDOW_SECONDS=1), so each instance gives about
   5 meter events per second it ran.
2. Lag: BENCH_LAG_N (50) instances, one after another, each RUNNING, then TERMINATED now; measured
   from the TERMINATED XADD to (a) GetUsage showing the instance ended with its final usage and
   (b) the stand-in holding its last window's instance_seconds event.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import redis

from bench._report import latency_summary, report
from billing_svc.stripe_standin import StandinControl
from cyberdesk_common.lifecycle_events import STREAM, InstanceState, LifecycleEvent
from cyberdesk_common.metadata import INTERNAL_TOKEN_METADATA, TENANT_METADATA
from cyberdesk_proto.v1 import billing_pb2, billing_pb2_grpc
from cyberdesk_stack.processes import free_port, redis_server, spawn, stop, wait_healthy

INSTANCES = int(os.environ.get("BENCH_INSTANCES", "400"))
LAG_N = int(os.environ.get("BENCH_LAG_N", "50"))
KEY = "sk_test_bench"
TOKEN = "bench-billing-" + "x" * 32
TENANTS = 8
RUN_S = 30  # each throughput instance: ~22 s RUNNING and ~8 s PAUSED


def _event(tenant: str, instance: str, old: InstanceState | None, new: InstanceState, t: float) -> LifecycleEvent:
    return LifecycleEvent(
        event_id=str(uuid.uuid4()),
        tenant=tenant,
        instance_id=instance,
        old_state=old,
        new_state=new,
        time_us=int(t * 1_000_000),
        vcpus=2,
        memory_mib=2048,
        template="desktop",
        state_message="",
        disk_mib=4096,
        desktop=True,
    )


def _life(tenant: str, instance: str, t0: float) -> list[LifecycleEvent]:
    s = InstanceState
    moves = [
        (None, s.PENDING, t0),
        (s.PENDING, s.STARTING, t0 + 0.2),
        (s.STARTING, s.RUNNING, t0 + 0.9),
        (s.RUNNING, s.PAUSED, t0 + 12.4),
        (s.PAUSED, s.RUNNING, t0 + 20.6),
        (s.RUNNING, s.STOPPING, t0 + RUN_S - 0.4),
        (s.STOPPING, s.TERMINATED, t0 + RUN_S),
    ]
    return [_event(tenant, instance, old, new, t) for old, new, t in moves]


def _publish(client: redis.Redis, events: list[LifecycleEvent]) -> None:
    pipe = client.pipeline(transaction=False)
    for e in sorted(events, key=lambda e: e.time_us):
        pipe.xadd(STREAM, e.fields())  # type: ignore[arg-type]
    pipe.execute()


def _usage(stub: billing_pb2_grpc.BillingServiceStub, tenant: str, instance: str = "") -> billing_pb2.GetUsageResponse:
    request = billing_pb2.GetUsageRequest(instance_id=instance, page_size=1000)
    request.start_time.FromSeconds(int(time.time()) - 3 * 3600)
    reply: billing_pb2.GetUsageResponse = stub.GetUsage(
        request, metadata=((INTERNAL_TOKEN_METADATA, TOKEN), (TENANT_METADATA, tenant)), timeout=30
    )
    return reply


def _ended(stub: billing_pb2_grpc.BillingServiceStub, tenant: str, instance: str) -> bool:
    try:
        reply = _usage(stub, tenant, instance)
    except grpc.RpcError:
        return False  # NOT_FOUND until its first event is applied
    return bool(reply.instances) and not reply.instances[0].open


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="cdb-billing-", dir="/tmp"))
    standin_port = free_port()
    standin_log = open(tmp / "standin.log", "ab")  # noqa: SIM115 - closed in finally
    standin = subprocess.Popen(
        [sys.executable, "-m", "billing_svc.stripe_standin", "--port", str(standin_port), "--api-key", KEY],
        stdout=standin_log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{standin_port}"
    control = StandinControl(url)
    billing = None
    try:
        with redis_server(tmp) as redis_url:
            addr = f"127.0.0.1:{free_port()}"
            env = {
                "CYBERDESK_STATE_DIR": str(tmp / "state"),
                "CYBERDESK_BILLING_DB": str(tmp / "ledger.db"),
                "CYBERDESK_BILLING_ADDR": addr,
                "CYBERDESK_INTERNAL_TOKEN": TOKEN,
                "CYBERDESK_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
                "REDIS_URL": redis_url,
                "CYBERDESK_STRIPE_SECRET_KEY": KEY,
                "CYBERDESK_STRIPE_API_BASE": url,
                "CYBERDESK_STRIPE_POLL_SECONDS": "0.02",
                "CYBERDESK_BILLING_WINDOW_SECONDS": "1",
            }
            if os.environ.get("BENCH_STRIPE_CONCURRENCY"):  # else billing_svc's own default
                env["CYBERDESK_STRIPE_CONCURRENCY"] = os.environ["BENCH_STRIPE_CONCURRENCY"]
            _wait_standin(control, standin)
            billing = spawn([sys.executable, "-m", "billing_svc"], env, tmp / "billing_svc.log")
            wait_healthy(addr, timeout=60, proc=billing)
            client = redis.Redis.from_url(redis_url)
            stub = billing_pb2_grpc.BillingServiceStub(grpc.insecure_channel(addr))
            rows, extra = _throughput(client, stub, control, billing.pid, standin.pid, tmp / "ledger.db")
            lag_rows = _lag(client, stub, control)
            client.close()
    finally:
        if billing is not None:
            stop(billing)
        standin.terminate()
        standin.wait(10)
        standin_log.close()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
    columns = ["series", "n", "seconds", "per_s", "billing_cpu_s", "per_billing_cpu_s", "p50_ms", "p90_ms", "p99_ms"]
    table = [{c: row.get(c, "") for c in columns} | row for row in rows + lag_rows]
    report(
        "billing_pipeline",
        table,
        note=(
            "events/s from the first XADD: lifecycle events until GetUsage shows every instance ended; meter "
            "events until the Stripe stand-in (own process) accepted each 1 s window's event over the v2 stream. "
            "Lag rows: ms from an instance's TERMINATED XADD to GetUsage showing it ended (ledger) and to the "
            "stand-in holding its last window (stripe); the Stripe side waits for the window to close (the "
            "ledger's watermark past its end + 1 s) by design. billing_cpu_s: CPU time billing_svc used in the "
            "phase (user + system), for a rate that does not depend on what else the machine runs"
        ),
        load_average_at_end=[round(v, 2) for v in os.getloadavg()],
        **extra,
    )


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process used so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_standin(control: StandinControl, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            control.state()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the Stripe stand-in did not start") from None
            time.sleep(0.05)


def _throughput(
    client: redis.Redis,
    stub: billing_pb2_grpc.BillingServiceStub,
    control: StandinControl,
    pid: int,
    standin_pid: int,
    db: Path,
) -> tuple[list[dict[str, object]], dict[str, object]]:
    now = time.time()
    base = now - RUN_S - 60  # every life ended a minute ago: all its windows can close at once
    lives = {}
    events: list[LifecycleEvent] = []
    for k in range(INSTANCES):
        tenant, instance = f"t-bench-{k % TENANTS}", f"i-bench-{k:05d}"
        lives[instance] = tenant
        events += _life(tenant, instance, base + (k % 50) * 0.7 + 0.13)
    sentinel = _event("t-bench-0", "i-bench-watermark", None, InstanceState.PENDING, now - 0.5)
    cpu0, standin_cpu0 = _cpu_seconds(pid), _cpu_seconds(standin_pid)
    t0 = time.monotonic()
    _publish(client, [*events, sentinel])
    published_s = time.monotonic() - t0
    # Into the ledger: every instance ended in GetUsage (one call per tenant lists them all).
    while True:
        ended = 0
        for t in range(TENANTS):
            reply = _usage(stub, f"t-bench-{t}")
            ended += sum(1 for i in reply.instances if i.instance_id.startswith("i-bench-0") and not i.open)
        if ended >= INSTANCES:
            break
        time.sleep(0.05)
    ledger_s = time.monotonic() - t0
    ledger_cpu = _cpu_seconds(pid) - cpu0
    totals = [_usage(stub, f"t-bench-{t}").total for t in range(TENANTS)]
    # Out to Stripe: until the stand-in holds as many events as billing_svc queued for these lives,
    # once every window up to the last end is closed (read from the ledger file, read-only).
    last_end = int(max(e.time_us for e in events) // 1_000_000) + 1
    while True:
        ro = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            closed = ro.execute("SELECT MAX(window_end) FROM stripe_windows").fetchone()[0] or 0
            mine = "SELECT COUNT(*) FROM stripe_outbox WHERE identifier LIKE 'cd1:i-bench-%'"
            queued = ro.execute(mine).fetchone()[0]
        finally:
            ro.close()
        if closed >= last_end:
            break
        time.sleep(0.05)
    while (count := control.count()["events"]) < queued:
        time.sleep(0.02)
    stripe_s = time.monotonic() - t0
    billing_cpu = _cpu_seconds(pid) - cpu0
    standin_cpu = _cpu_seconds(standin_pid) - standin_cpu0
    accepted: list[dict[str, object]] = control.state()["events"]
    at_stripe = {m: 0 for m in ("instance_seconds", "vcpu_seconds", "memory_mib_seconds", "desktop_seconds")}
    for e in accepted:
        name = str(e["event_name"]).removeprefix("cyberdesk_")
        if name in at_stripe and str(e["identifier"]).startswith("cd1:i-bench-"):
            at_stripe[name] += int(str(e["value"]))
    ledger_totals = {
        "instance_seconds": sum(t.instance_seconds for t in totals),
        "vcpu_seconds": sum(t.vcpu_seconds for t in totals),
        "memory_mib_seconds": sum(t.memory_mib_seconds for t in totals),
        "desktop_seconds": sum(t.desktop_seconds for t in totals),
    }
    state = control.state()
    rows: list[dict[str, object]] = [
        {
            "series": "lifecycle events -> ledger",
            "n": len(events) + 1,
            "seconds": round(ledger_s, 2),
            "per_s": round((len(events) + 1) / ledger_s),
            "billing_cpu_s": round(ledger_cpu, 2),
            "per_billing_cpu_s": round((len(events) + 1) / ledger_cpu) if ledger_cpu else "",
        },
        {
            "series": "meter events -> Stripe stand-in",
            "n": count,
            "seconds": round(stripe_s, 2),
            "per_s": round(count / stripe_s),
            "billing_cpu_s": round(billing_cpu, 2),
            "per_billing_cpu_s": round(count / billing_cpu) if billing_cpu else "",
        },
    ]
    extra: dict[str, object] = {
        "instances": INSTANCES,
        "xadd_seconds": round(published_s, 2),
        "stripe_equals_ledger": at_stripe == ledger_totals,
        "standin_cpu_s": round(standin_cpu, 2),
        "stripe_totals": at_stripe,
        "ledger_totals": ledger_totals,
        "stream_requests": sum(1 for r in state["requests"] if r[1] == "/v2/billing/meter_event_stream"),
        "conflicts": len(state["conflicts"]),
        "resubmitted": sum(n - 1 for n in state["submissions"].values()),
    }
    return rows, extra


def _lag(
    client: redis.Redis, stub: billing_pb2_grpc.BillingServiceStub, control: StandinControl
) -> list[dict[str, object]]:
    ledger_ms: list[float] = []
    stripe_ms: list[float] = []
    for k in range(LAG_N):
        tenant, instance = "t-lag", f"i-lag-{k:04d}"
        start = time.time() - 3.3
        _publish(
            client,
            [
                _event(tenant, instance, None, InstanceState.PENDING, start),
                _event(tenant, instance, InstanceState.PENDING, InstanceState.RUNNING, start + 0.1),
            ],
        )
        end = time.time()
        t0 = time.monotonic()
        _publish(client, [_event(tenant, instance, InstanceState.RUNNING, InstanceState.TERMINATED, end)])
        while not _ended(stub, tenant, instance):
            time.sleep(0.002)
        ledger_ms.append((time.monotonic() - t0) * 1000)
        # The last window with RUNNING time is the one before the end's whole second (an interval
        # a..b counts floor(b) - floor(a) seconds). It closes once the ledger's watermark is a second
        # past its end: on a live platform any later change moves it; here a marker event a 100 ms does.
        last_window = f"cd1:{instance}:instance_seconds:{int(end) - 1}"
        marked = 0.0
        while not control.has(last_window):
            if time.monotonic() - marked > 0.1:
                _publish(
                    client,
                    [_event(tenant, f"i-lag-mark-{uuid.uuid4().hex[:8]}", None, InstanceState.PENDING, time.time())],
                )
                marked = time.monotonic()
            if time.monotonic() - t0 > 30:
                raise RuntimeError(f"{last_window} never reached the stand-in")
            time.sleep(0.02)
        stripe_ms.append((time.monotonic() - t0) * 1000)
    return [
        {"series": "lag: instance end -> visible in GetUsage", **latency_summary(ledger_ms)},
        {"series": "lag: instance end -> its last window at Stripe", **latency_summary(stripe_ms)},
    ]


if __name__ == "__main__":
    main()
