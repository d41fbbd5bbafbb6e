"""instance_svc: kill -9 of a sandbox's guest agent -> its FAILED event on the Redis stream.

A real instance_svc process (local runtime, its own redis-server and state directory). One sample:
create an instance, note the end of the event stream, SIGKILL the agent (the sandbox's PID 1, its
host pid from the sandbox's state file), then XREAD until the instance's FAILED event arrives.
What is timed is kill -> event: the pidfd wake-up, the exit status, the teardown of the sandbox
(which comes before the FAILED record), the outbox commit and the publisher's XADD.

Two series: sandboxes this instance_svc started (it is bubblewrap's parent), and sandboxes it
re-adopted after a kill -9 of itself and a restart (bubblewrap is init's child by then).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import grpc
import redis

from bench._launch import INTERNAL_TOKEN, instance_svc_setting
from bench._report import latency_summary, report
from cyberdesk_common.lifecycle_events import STREAM
from cyberdesk_common.metadata import internal_metadata
from cyberdesk_proto.v1 import instance_pb2, instance_pb2_grpc
from cyberdesk_stack.processes import spawn, wait_healthy

N = int(os.environ.get("BENCH_N", "10"))
TOKEN = INTERNAL_TOKEN
META = internal_metadata("bench", TOKEN)
# XREAD's reply with decode_responses: [(stream, [(entry id, fields)])].
_XRead = list[tuple[str, list[tuple[str, dict[str, str]]]]]


class _Svc:
    def __init__(self, state: Path, env: dict[str, str], target: str) -> None:
        self.state, self.env, self.target = state, env, target
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        log = self.state / f"instance_svc.{self.runs}.log"
        self.proc = spawn([sys.executable, "-m", "instance_svc"], self.env, log)
        wait_healthy(self.target, timeout=60, proc=self.proc)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def _instance_svc() -> Iterator[tuple[_Svc, str]]:
    with instance_svc_setting() as (state, env, target):
        env["INSTANCE_SVC_ON_SHUTDOWN"] = "end"
        svc = _Svc(state, env, target)
        svc.start()
        try:
            yield svc, env["REDIS_URL"]
        finally:
            svc.stop()


def _create(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        created = instance_pb2_grpc.InstanceServiceStub(channel).CreateInstance(
            instance_pb2.CreateInstanceRequest(disk_mib=256), metadata=META, timeout=120
        )
    if created.instance.state != instance_pb2.INSTANCE_STATE_RUNNING:
        raise RuntimeError(f"create failed: {created.instance.state_message}")
    return created.instance.instance_id


def _kill_to_event(svc: _Svc, client: redis.Redis, instance_id: str) -> tuple[float, str]:
    """(ms from SIGKILL of the agent to the FAILED event on the stream, its state_message)."""
    state = json.loads((svc.state / "instances" / ("sb-" + instance_id[2:]) / "state.json").read_text())
    last = client.xrevrange(STREAM, count=1)
    since = str(last[0][0]) if last else "0-0"
    start = time.perf_counter()
    os.kill(int(state["init_pid"]), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reply = cast(_XRead, client.xread({STREAM: since}, block=1000) or [])
        for _stream, entries in reply:
            for entry_id, fields in entries:
                since = entry_id
                if fields["instance_id"] == instance_id and fields["new_state"] == "FAILED":
                    return (time.perf_counter() - start) * 1000, fields["state_message"]
    raise RuntimeError(f"no FAILED event of {instance_id} within 30 s")


def main() -> None:
    """Run both series and report them."""
    started: list[float] = []
    adopted: list[float] = []
    messages: set[str] = set()
    with _instance_svc() as (svc, redis_url):
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        for _ in range(N):
            ms, message = _kill_to_event(svc, client, _create(svc.target))
            started.append(ms)
            messages.add(message)
        for _ in range(N):
            instance_id = _create(svc.target)
            svc.kill9()
            svc.start()
            ms, message = _kill_to_event(svc, client, instance_id)
            adopted.append(ms)
            messages.add(message)
        client.close()
    rows = [
        {"series": "started by this instance_svc: kill -9 agent -> FAILED event", **latency_summary(started)},
        {"series": "re-adopted after a restart: kill -9 agent -> FAILED event", **latency_summary(adopted)},
    ]
    report(
        "agent_death",
        rows,
        state_messages=sorted(messages),
        note=(
            "pidfd of the agent and of bubblewrap on instance_svc's event loop (no polling); the time includes "
            "the sandbox's teardown (kill, cgroups, disk unmount and loop detach), which precedes the FAILED record"
        ),
    )


if __name__ == "__main__":
    main()
