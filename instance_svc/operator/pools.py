"""The reconciler of a CyberdeskWarmPool: keep `size` unclaimed VMs running, each with its own Secret.

Members are named <pool>-<serial> with serials never reused (status.nextSerial is advanced before
the objects are written, so a crash between the two only skips a serial), labelled with the pool
and "starting" until their agent answered, then "ready". A claim (instances.Reconciler._claim)
takes a ready member's labels away under its resourceVersion; this reconciler sees the member
leave the pool's index and starts a new one.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Any

from instance_svc.operator import agent, contract, manifests
from instance_svc.operator.kube import KubeError, path
from instance_svc.operator.state import OperatorState
from instance_svc.runtime.base import AgentEndpoint

Obj = dict[str, Any]


class PoolReconciler:
    def __init__(
        self, state: OperatorState, namespace: str, name: str, log: logging.Logger | logging.LoggerAdapter[Any]
    ) -> None:
        self.state = state
        self.ns = namespace
        self.name = name
        self.log = log
        self.template: Obj | None = None
        self.tokens: dict[str, Obj] = {}  # member -> its Secret (for the readiness probe)
        self.next_serial: int | None = None
        self.retry = 0.05
        # Members written but not in the index yet (the watch lags): counted, so none is written twice.
        self.pending: dict[str, float] = {}

    async def reconcile(self, body: Any, pool_members: Any, vmis: Any) -> float | None:
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        size = int(spec.get("size", 0))
        members = [m for m in (pool_members.get((self.ns, self.name)) or []) if not m["deleting"]]
        seen = {m["name"] for m in members}
        horizon = time.monotonic() - 30.0
        self.pending = {n: t for n, t in self.pending.items() if n not in seen and t > horizon}
        if self.template is None:
            self.template = await self.state.kube.get(
                path(contract.GROUP, contract.VERSION, contract.TEMPLATE_PLURAL, self.ns, str(spec.get("template", "")))
            )
            if self.template is None:
                self.log.warning("warm pool %s: template %r does not exist", self.name, spec.get("template"))
                return self.state.settings.retry_max
        port = int((self.template.get("spec") or {}).get("agentPort", contract.DEFAULT_AGENT_PORT))
        retry: float | None = None

        # Readiness: a starting member whose VMI runs and whose agent answers becomes ready.
        probes = []
        for m in members:
            if m["state"] != contract.POOL_STATE_STARTING:
                continue
            vmi = _one(vmis, (self.ns, m["name"]))
            if vmi is None or vmi["phase"] != "Running" or not vmi["ip"]:
                continue
            probes.append(self._probe(m["name"], f"{vmi['ip']}:{port}"))
        if probes:
            results = await asyncio.gather(*probes)
            if not all(results):
                retry = self._backoff()
            else:
                self.retry = 0.05

        # Size: start what is missing, stop what is too much (starting ones first).
        missing = size - len(members) - len(self.pending)
        if missing > 0:
            first = max(int(status.get("nextSerial", 0)), self.next_serial or 0)
            self.next_serial = first + missing
            await self.state.kube.patch(
                path(contract.GROUP, contract.VERSION, contract.WARM_POOL_PLURAL, self.ns, self.name, "status"),
                {"status": {"nextSerial": self.next_serial}},
            )
            await asyncio.gather(
                *(self._start(body, f"{self.name}-{serial}", port) for serial in range(first, first + missing))
            )
        elif missing < 0 and not self.pending:
            # Starting ones first, then the newest; under the resourceVersion the index saw, so a
            # member claimed meanwhile (its labels changed) is never deleted: that delete is a 409.
            surplus = sorted(members, key=lambda m: (m["state"] == contract.POOL_STATE_READY, -_serial(m["name"])))
            for m in surplus[:-missing]:
                self.log.info("warm pool %s: stopping surplus member %s", self.name, m["name"])
                try:
                    await self.state.kube.delete(
                        path(
                            contract.KUBEVIRT_GROUP, contract.KUBEVIRT_VERSION, contract.VM_PLURAL, self.ns, m["name"]
                        ),
                        resource_version=m["rv"],
                    )
                except KubeError as e:
                    if e.status != 409:
                        raise
                    retry = self._backoff()
        ready = sum(1 for m in members if m["state"] == contract.POOL_STATE_READY)
        if (status.get("members"), status.get("ready")) != (len(members), ready):
            await self.state.kube.patch(
                path(contract.GROUP, contract.VERSION, contract.WARM_POOL_PLURAL, self.ns, self.name, "status"),
                {
                    "status": {
                        "members": len(members),
                        "ready": ready,
                        "observedGeneration": body["metadata"].get("generation", 0),
                    }
                },
            )
        return retry

    def _backoff(self) -> float:
        delay = self.retry
        self.retry = min(self.retry * 2, self.state.settings.retry_max)
        return delay

    async def _start(self, pool: Any, vm_name: str, port: int) -> None:
        assert self.template is not None
        owner = manifests.owner_ref(
            {"apiVersion": contract.API_VERSION, "kind": contract.WARM_POOL_KIND, "metadata": pool["metadata"]}
        )
        shape = manifests.Shape.of(pool.get("spec") or {})
        labels = manifests.common_labels(vm_name, pool=self.name)
        secret = manifests.secret(vm_name, self.ns, owner=owner, labels=labels, port=port, instance_id="", shape=shape)
        written = {contract.ANNOTATION_WRITTEN_BY: self.state.settings.operator_id}
        secret["metadata"]["annotations"] = written
        self.tokens[vm_name], _ = await self.state.kube.create(path("", "v1", "secrets", self.ns), secret)
        policy = manifests.network_policy(vm_name, self.ns, owner=owner, labels=labels, port=port, network=None)
        await self.state.kube.create(path("networking.k8s.io", "v1", "networkpolicies", self.ns), policy)
        vm = manifests.virtual_machine(
            vm_name, self.ns, template=self.template, shape=shape, owner=owner, labels=labels, annotations=written
        )
        await self.state.kube.create(
            path(contract.KUBEVIRT_GROUP, contract.KUBEVIRT_VERSION, contract.VM_PLURAL, self.ns), vm
        )
        self.log.info("warm pool %s: started %s", self.name, vm_name)

    async def _probe(self, vm_name: str, target: str) -> bool:
        secret = self.tokens.get(vm_name) or await self.state.kube.get(
            path("", "v1", "secrets", self.ns, contract.secret_name(vm_name))
        )
        if secret is None:
            return False
        self.tokens[vm_name] = secret
        data = secret.get("data") or {}
        endpoint = AgentEndpoint(
            target=target,
            token=base64.b64decode(data.get(contract.SECRET_KEY_TOKEN, "")).decode(),
            ca_pem=base64.b64decode(data.get(contract.SECRET_KEY_CA, "")).decode(),
            server_name=contract.agent_server_name(vm_name),
        )
        try:
            await agent.probe(endpoint, self.state.settings.agent_timeout)
        except (agent.AgentNotReady, agent.AgentRefused):
            return False
        try:
            await self.state.kube.patch(
                path(contract.KUBEVIRT_GROUP, contract.KUBEVIRT_VERSION, contract.VM_PLURAL, self.ns, vm_name),
                {"metadata": {"labels": {contract.LABEL_POOL_STATE: contract.POOL_STATE_READY}}},
            )
        except KubeError as e:
            if e.status != 404:
                raise
        self.tokens.pop(vm_name, None)
        return True


def _serial(name: str) -> int:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _one(index: Any, key: Any) -> Any:
    store = index.get(key) if index is not None else None
    return next(iter(store), None) if store else None
