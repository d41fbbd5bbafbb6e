"""A Kubernetes API server emulator on loopback (built on kmock), for tests and bench without a cluster.

`EmulatorThread` serves it from a thread (in-process tests), `python -m kube_emulator --port N`
from a process; `write_kubeconfig` points the real `kubernetes` clients and kopf at it;
`kube_emulator.virt_controller` plays KubeVirt's controllers against it. What it emulates and
what not: kube_emulator/emulator.py's docstring and docs/kubernetes.md.
"""

from kube_emulator.emulator import ApiError, Emulator, Resource
from kube_emulator.runner import EmulatorThread, kubeconfig, write_kubeconfig

__all__ = ["ApiError", "Emulator", "EmulatorThread", "Resource", "kubeconfig", "write_kubeconfig"]
