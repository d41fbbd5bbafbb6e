"""A `cyberdesk up` stack for the billing tests: its ports, its internal token, a client per tenant.

Everything is real: Redis (with its append-only file), instance_svc with bubblewrap sandboxes,
billing_svc, the gateway. Plans are moved through billing_svc's internal PlanService with the
stack's internal token, as the Stripe webhook path does.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2

from cyberdesk import Cyberdesk
from cyberdesk_common.metadata import INTERNAL_TOKEN_METADATA
from cyberdesk_proto.internal.v1 import billing_pb2 as internal_pb2
from cyberdesk_proto.internal.v1 import billing_pb2_grpc as internal_grpc
from cyberdesk_proto.v1 import billing_pb2
from tests.cli.stack import RunningStack

T = TypeVar("T")


def us(when: dt.datetime) -> int:
    """Microseconds since the epoch, exactly (no float)."""
    return (when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


@dataclass
class BillingStack:
    """The running stack and what the billing tests need of it."""

    running: RunningStack
    billing_addr: str
    http_endpoint: str
    admin_key: str
    internal_token: str
    _clients: list[Cyberdesk] = field(default_factory=list)

    @classmethod
    def of(cls, running: RunningStack) -> BillingStack:
        """Read the ports from the banner and the secrets from the state directory."""
        banner = running.output.decode(errors="replace")
        match = re.search(r"billing_svc\s+(\S+)", banner)
        assert match, banner
        config = json.loads(running.config.read_text())
        token = (running.state_dir / "internal_token").read_text().strip()
        return cls(running, match.group(1), config["http_endpoint"], config["api_key"], token)

    def tenant(self, name: str) -> tuple[Cyberdesk, str]:
        """A client with a fresh key of tenant `name`, and the key's secret."""
        with Cyberdesk(api_key=self.admin_key, endpoint=self.running.gateway) as admin:
            _key, secret = admin.keys.create(name, f"billing-test-{name}")
        client = Cyberdesk(api_key=secret, endpoint=self.running.gateway)
        self._clients.append(client)
        return client, secret

    def plans(self) -> internal_grpc.PlanServiceStub:
        """PlanService on billing_svc (call with `metadata=self.internal()`)."""
        channel = grpc.insecure_channel(self.billing_addr)
        return internal_grpc.PlanServiceStub(channel)

    def internal(self) -> tuple[tuple[str, str]]:
        """The metadata of an internal caller."""
        return ((INTERNAL_TOKEN_METADATA, self.internal_token),)

    def set_plan(self, tenant: str, **limits: Any) -> None:
        """Give `tenant` a plan ("test", roomy unless `limits` say otherwise)."""
        plan = billing_pb2.Plan(
            name="test",
            max_instances=limits.get("max_instances", 10),
            max_vcpus=limits.get("max_vcpus", 20),
            max_memory_mib=limits.get("max_memory_mib", 20480),
            max_disk_mib=limits.get("max_disk_mib", 102400),
            monthly_instance_seconds=limits.get("monthly_instance_seconds", 0),
            max_timeout=duration_pb2.Duration(seconds=limits.get("max_timeout_s", 3600)),
            desktops_allowed=limits.get("desktops_allowed", True),
            credit_policy=limits.get("credit_policy", billing_pb2.CREDIT_POLICY_PAUSE),
            credit_grace=duration_pb2.Duration(seconds=limits.get("credit_grace_s", 60)),
        )
        reply = self.plans().SetTenantPlan(
            internal_pb2.SetTenantPlanRequest(tenant_id=tenant, plan=plan, source="test"),
            metadata=self.internal(),
            timeout=10,
        )
        assert reply.applied

    def pids(self) -> dict[str, int]:
        """The current pid of each child of `cyberdesk up`."""
        pids: dict[str, int] = json.loads((self.running.state_dir / "pids.json").read_text())
        return pids

    def close(self) -> None:
        """Close the clients made by `tenant`."""
        for client in self._clients:
            client.close()
