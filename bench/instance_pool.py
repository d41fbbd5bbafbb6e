"""instance_svc: create -> first exec possible, from the warm pool and cold, through its gRPC API.

A real instance_svc process (local runtime, its own redis-server and state directory) is called
like the gateway calls it. One sample is: CreateInstance, ResolveInstance, then StartProcess of
`true` through the resolved agent until its exit event. Instances are created one at a time and
deleted after each sample. For the warm-pool series the benchmark waits until the pool is full
again before each create (and checks that the instance really runs in a pre-started sandbox), so
every sample is a claim; the cold series runs with the pool off.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from bench._launch import INTERNAL_TOKEN, instance_svc_setting
from bench._report import latency_summary, report
from cyberdesk_common.metadata import agent_metadata, internal_metadata
from cyberdesk_proto.internal.v1 import routing_pb2, routing_pb2_grpc
from cyberdesk_proto.v1 import instance_pb2, instance_pb2_grpc, process_pb2, process_pb2_grpc
from cyberdesk_stack.processes import service

N = int(os.environ.get("BENCH_N", "30"))
N_COLD = int(os.environ.get("BENCH_N_COLD", "10"))
POOL = 2
TOKEN = INTERNAL_TOKEN
META = internal_metadata("bench", TOKEN)


@contextmanager
def _instance_svc(pool: int) -> Iterator[tuple[grpc.Channel, Path]]:
    # instance_svc keeps instance sandboxes on SIGTERM (they are re-adopted); the benchmark deletes
    # its instances, and the idle pool sandboxes are deleted on SIGTERM.
    with (
        instance_svc_setting(warm_pool=f"base={pool}") as (state, env, target),
        service("instance_svc", target, env, state, timeout=30),
        grpc.insecure_channel(target) as channel,
    ):
        yield channel, state


def _first_exec(channel: grpc.Channel) -> tuple[float, float, str]:
    """(create ms, create -> first exec done ms, agent target) of one instance."""
    instances = instance_pb2_grpc.InstanceServiceStub(channel)
    routing = routing_pb2_grpc.RoutingServiceStub(channel)
    start = time.perf_counter()
    created = instances.CreateInstance(instance_pb2.CreateInstanceRequest(), metadata=META, timeout=60).instance
    created_at = time.perf_counter()
    if created.state != instance_pb2.INSTANCE_STATE_RUNNING:
        raise RuntimeError(f"create failed: {created.state_message}")
    resolved = routing.ResolveInstance(
        routing_pb2.ResolveInstanceRequest(tenant_id="bench", instance_id=created.instance_id), metadata=META
    )
    with grpc.insecure_channel(resolved.agent_target) as agent:
        for reply in process_pb2_grpc.ProcessServiceStub(agent).StartProcess(
            process_pb2.StartProcessRequest(instance_id=created.instance_id, argv=["true"]),
            metadata=agent_metadata(resolved.agent_token),
            timeout=30,
        ):
            # The exit event is the stream's last: read to the end rather than cancel.
            if reply.event.HasField("exited") and reply.event.exited.exit_code != 0:
                raise RuntimeError(f"first exec failed: {reply.event.exited}")
    done = time.perf_counter()
    instances.DeleteInstance(
        instance_pb2.DeleteInstanceRequest(instance_id=created.instance_id), metadata=META, timeout=60
    )
    return (created_at - start) * 1000, (done - start) * 1000, resolved.agent_target


def _series(pool: int, n: int) -> tuple[list[float], list[float]]:
    create_ms, exec_ms = [], []
    with _instance_svc(pool) as (channel, state):
        claimed: set[str] = set()
        for _ in range(n):
            if pool:
                deadline = time.monotonic() + 60
                while len({p.name for p in (state / "instances").glob("p-*")} - claimed) < pool:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the warm pool did not refill within 60 s")
                    time.sleep(0.05)
                time.sleep(0.3)  # the newest pooled agent may still be finishing its start-up
            c_ms, e_ms, target = _first_exec(channel)
            if pool:
                sandbox = target.split("/instances/")[1].split("/")[0]
                if not sandbox.startswith("p-"):
                    raise RuntimeError(f"expected a warm-pool claim, got a cold sandbox {sandbox}")
                claimed.add(sandbox)
            create_ms.append(c_ms)
            exec_ms.append(e_ms)
    return create_ms, exec_ms


def main() -> None:
    """Run the warm and cold series and report them."""
    warm_create, warm_exec = _series(POOL, N)
    cold_create, cold_exec = _series(0, N_COLD)
    rows = [
        {"series": "warm pool: CreateInstance", **latency_summary(warm_create)},
        {"series": "warm pool: create -> first exec done", **latency_summary(warm_exec)},
        {"series": "cold: CreateInstance", **latency_summary(cold_create)},
        {"series": "cold: create -> first exec done", **latency_summary(cold_exec)},
    ]
    warm_p50 = latency_summary(warm_exec)["p50_ms"]
    cold_p50 = latency_summary(cold_exec)["p50_ms"]
    report(
        "instance_pool",
        rows,
        warm_pool_size=POOL,
        cold_over_warm_p50=round(cold_p50 / warm_p50, 2),
        note="through instance_svc's gRPC API (no gateway); exec is StartProcess(['true']) on the resolved agent",
    )


if __name__ == "__main__":
    main()
