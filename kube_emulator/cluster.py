"""A whole emulated cluster for tests and bench: API emulator, KubeVirt stand-in, real guest agents.

    with EmulatedCluster(workdir) as cluster:
        cluster.kubeconfig            # for the real clients, kopf, the operator, instance_svc
        cluster.apply(template)       # write objects through the emulator's store
        cluster.guests.vms            # the booted guest agents (loopback TLS)

The operator under test runs separately: `OperatorThread` (in-process, its own loop) or as
`python -m instance_svc.operator` (a subprocess, for kill -9 and peering), both pointed at
`cluster.kubeconfig`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from kube_emulator.emulator import Emulator
from kube_emulator.guest import AgentGuests
from kube_emulator.runner import EmulatorThread
from kube_emulator.virt_controller import VirtController

T = TypeVar("T")

CYBERDESK_NS = "cyberdesk"


class EmulatedCluster:
    def __init__(self, workdir: Path, namespaces: Iterable[str] = (CYBERDESK_NS,), step_seconds: float = 0.005) -> None:
        self.workdir = workdir
        self.api = EmulatorThread(namespaces=("default", "kube-system", *namespaces))
        self.guests = AgentGuests(workdir / "guests")
        self.step_seconds = step_seconds
        self.controller: VirtController | None = None
        self.kubeconfig = workdir / "kubeconfig"

    def start(self) -> EmulatedCluster:
        self.api.start()
        self.api.write_kubeconfig(self.kubeconfig, CYBERDESK_NS)
        self.controller = self.call(lambda em: VirtController(em, self.guests, step_seconds=self.step_seconds).start())
        return self

    def stop(self) -> None:
        if self.controller is not None:
            controller = self.controller
            self.call(lambda em: controller.stop())
        self.api.submit(self.guests.close()).result(30)
        self.api.stop()

    def __enter__(self) -> EmulatedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self.api.url

    def call(self, fn: Callable[[Emulator], T]) -> T:
        return self.api.call(fn)

    def apply(self, key: str, obj: dict[str, Any], namespace: str = CYBERDESK_NS) -> dict[str, Any]:
        """Create `obj` (key: "group/version/plural") as a client's POST would."""
        return self.call(lambda em: em.put_object(key, obj, namespace))

    def get(self, key: str, name: str, namespace: str = CYBERDESK_NS) -> dict[str, Any] | None:
        return self.call(lambda em: em.get_object(key, name, namespace))

    def list(self, key: str, selector: str = "", namespace: str = CYBERDESK_NS) -> list[dict[str, Any]]:
        return self.call(lambda em: em.list_objects(key, namespace, selector))


class OperatorThread:
    """`instance_svc.operator.app.run` on a thread with its own event loop, until `stop()`."""

    def __init__(self, kubeconfig: Path, env: Mapping[str, str] | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.env = dict(env or {})
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.memo: Any = None

    def start(self, timeout: float = 60.0) -> OperatorThread:
        # The operator reads its settings from the environment (as in a pod); set before it starts,
        # restored at the stop (processes started later must not inherit them).
        wanted = {"KUBECONFIG": str(self.kubeconfig), **self.env}
        self._saved = {k: os.environ.get(k) for k in wanted}
        os.environ.update(wanted)
        import kopf

        self.memo = kopf.Memo()
        self._thread = threading.Thread(target=self._run, name="instance-operator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self.error is not None:
            raise RuntimeError(f"the operator did not start: {self.error!r}")
        return self

    def _run(self) -> None:
        from instance_svc.operator.app import run

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(run(stop_flag=self._stop, ready_flag=self._ready, memo=self.memo))
        except BaseException as e:
            self.error = e
            self._ready.set()
        finally:
            loop.close()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for key, value in getattr(self, "_saved", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def __enter__(self) -> OperatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
