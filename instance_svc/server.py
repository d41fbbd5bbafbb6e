"""Wiring of instance_svc: store, runtime, warm pool, event publisher, lifecycle, gRPC servicers."""

from __future__ import annotations

import importlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from cyberdesk_common.config import ConfigError, env_int, env_str, internal_token, platform_redis_url, state_dir
from cyberdesk_common.grpc_server import RunningServer, ServerSpec
from cyberdesk_proto.internal.v1 import routing_pb2, routing_pb2_grpc
from cyberdesk_proto.v1 import instance_pb2, instance_pb2_grpc
from instance_svc.billing import NO_BILLING, BillingClient, PlanGate, billing_mode
from instance_svc.events import Publisher
from instance_svc.lifecycle import Lifecycle
from instance_svc.pool import WarmPool, parse_sizes
from instance_svc.quotas import QuotaTable
from instance_svc.runtime.base import Runtime
from instance_svc.servicer import InstanceServicer, RoutingServicer
from instance_svc.store import Store
from instance_svc.validation import MachineLimits


def make_runtime(name: str) -> Runtime:
    """The runtime named by CYBERDESK_RUNTIME: "local" (bubblewrap here) or "kubevirt" (the current kubeconfig)."""
    if name == "local":
        module = importlib.import_module("instance_svc.runtime.local")
        network = importlib.import_module("instance_svc.runtime.local.network")
        # Private ranges INTERNET instances may reach after all (e.g. a package mirror on the LAN).
        raw_ranges = env_str("EGRESS_ALLOW_RANGES", "")
        try:
            ranges = tuple(str(r) for r in network.parse_ranges(raw_ranges))
        except ValueError as err:
            raise ConfigError(f"CYBERDESK_EGRESS_ALLOW_RANGES: {err}") from None
        # The resolver of INTERNET instances whose egress names hosts (their dns_guard.py's upstream).
        upstream = env_str("EGRESS_DNS_UPSTREAM", network.SLIRP_DNS)
        try:
            ipaddress.ip_address(upstream)
        except ValueError:
            raise ConfigError(f"CYBERDESK_EGRESS_DNS_UPSTREAM={upstream!r} is not an IP address") from None
        options = module.LocalOptions(egress_allow_ranges=ranges, egress_dns_upstream=upstream)
        runtime: Runtime = module.LocalRuntime(state_dir() / "instances", options)
        return runtime
    if name == "kubevirt":
        kubevirt = importlib.import_module("instance_svc.runtime.kubevirt")
        return kubevirt.from_env()  # type: ignore[no-any-return]
    raise ConfigError(f"CYBERDESK_RUNTIME={name!r} is not available; use local or kubevirt")


def make_store(runtime: Runtime, base: Path) -> Store:
    """Where the records live: the cluster's resources for kubevirt (shared by every replica), else SQLite."""
    if runtime.name == "kubevirt":
        kubevirt = importlib.import_module("instance_svc.runtime.kubevirt")
        return kubevirt.store_for(runtime)  # type: ignore[no-any-return]
    return Store(base / "instance_svc.db")


# What a SIGTERM does to the instances (set by `cyberdesk up`, cyberdesk_stack/launcher.py):
# "keep" leaves their sandboxes running for the next start to re-adopt; "end" ends each one
# ("the stack was stopped", end time = now, its event published) before instance_svc exits.
ON_SHUTDOWN_ENV = "INSTANCE_SVC_ON_SHUTDOWN"
ON_SHUTDOWN_CHOICES = ("keep", "end")
# With "end": how long in-flight calls may drain, then how long ending the instances may take.
# With the outbox's last drain (at most 2 s, then the publisher's own 2 s) they stay within the
# 15 s a supervisor should wait before it kills.
_END_GRACE_S = 2.0
_END_BUDGET_S = 9.0


def on_shutdown_policy() -> str:
    """INSTANCE_SVC_ON_SHUTDOWN: "keep" (the default) or "end"."""
    value = os.environ.get(ON_SHUTDOWN_ENV, "").strip() or "keep"
    if value not in ON_SHUTDOWN_CHOICES:
        raise ConfigError(f"{ON_SHUTDOWN_ENV}={value!r}: use keep or end")
    return value


@dataclass
class App:
    """Everything instance_svc runs, built before the event loop starts."""

    spec: ServerSpec
    lifecycle: Lifecycle
    running: RunningServer | None = None
    on_shutdown: str = "keep"

    async def on_started(self, running: RunningServer) -> None:
        """Reconcile and start background work (calls wait for `lifecycle.ready`)."""
        self.running = running
        await self.lifecycle.start()

    async def on_stopping(self) -> None:
        """Stop accepting calls first, then background work; sandboxes keep running unless the policy is "end"."""
        end = self.on_shutdown == "end"
        if self.running is not None:
            await self.running.stop(_END_GRACE_S if end else self.spec.grace_seconds)
        await self.lifecycle.stop(end_instances=end, budget=_END_BUDGET_S)


def build_app() -> App:
    """Build instance_svc from the environment."""
    base = state_dir()
    on_shutdown = on_shutdown_policy()
    runtime = make_runtime(env_str("RUNTIME", "local"))
    store = make_store(runtime, base)
    # On kubevirt the operator keeps the warm pool (CyberdeskWarmPool resources), not instance_svc.
    pool_sizes = parse_sizes(env_str("WARM_POOL", "base=2,desktop=0")) if runtime.name == "local" else {}
    redis_url = platform_redis_url(base)
    token = internal_token(base)
    mode = billing_mode()
    billing: PlanGate = NO_BILLING
    if mode != "off":
        billing = BillingClient(env_str("BILLING_ADDR", "127.0.0.1:50071"), token, mode)
    lifecycle = Lifecycle(
        store=store,
        runtime=runtime,
        quotas=QuotaTable.from_env(),
        publisher=Publisher(store, redis_url),
        pool=WarmPool(runtime, pool_sizes),
        snapshot_dir=base / "snapshots",
        billing=billing,
    )
    limits = MachineLimits(
        max_vcpus=env_int("MAX_VCPUS", 8, minimum=1),
        max_memory_mib=env_int("MAX_MEMORY_MIB", 16384, minimum=128),
        max_disk_mib=env_int("MAX_DISK_MIB", 65536, minimum=256),
    )

    def register(server: grpc.aio.Server) -> Sequence[str]:
        instance_pb2_grpc.add_InstanceServiceServicer_to_server(
            InstanceServicer(lifecycle, token, limits, redis_url), server
        )
        routing_pb2_grpc.add_RoutingServiceServicer_to_server(RoutingServicer(lifecycle, token), server)
        return [
            instance_pb2.DESCRIPTOR.services_by_name["InstanceService"].full_name,
            routing_pb2.DESCRIPTOR.services_by_name["RoutingService"].full_name,
        ]

    spec = ServerSpec(name="instance_svc", addresses=[env_str("INSTANCE_ADDR", "127.0.0.1:50061")], register=register)
    return App(spec, lifecycle, on_shutdown=on_shutdown)


def build_spec() -> ServerSpec:
    """The server of instance_svc, listening on CYBERDESK_INSTANCE_ADDR (default 127.0.0.1:50061)."""
    return build_app().spec
