"""Cyberdesk: cloud desktops and sandboxes for AI agents. The Python SDK.

    from cyberdesk import Cyberdesk

    client = Cyberdesk()  # CYBERDESK_API_KEY / CYBERDESK_ENDPOINT, or the file `cyberdesk up` writes
    with client.instances.create() as box:
        print(box.exec("echo hello").stdout_text)

Every public name is loaded lazily (PEP 562): the guest agent inside each sandbox imports the
generated `cyberdesk.v1` modules, which runs this file first, so it must import nothing heavy.
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports exist for type checkers and IDEs)
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Cyberdesk": "cyberdesk._client",
    "Instances": "cyberdesk._client",
    "Snapshots": "cyberdesk._client",
    "Keys": "cyberdesk._client",
    "AsyncCyberdesk": "cyberdesk._async_client",
    "AsyncInstance": "cyberdesk._async_client",
    "AsyncProcess": "cyberdesk._async_client",
    "AsyncShell": "cyberdesk._async_client",
    "AsyncFiles": "cyberdesk._async_client",
    "AsyncDesktop": "cyberdesk._async_client",
    "Instance": "cyberdesk._instance",
    "Process": "cyberdesk._instance",
    "Files": "cyberdesk._files",
    "Watch": "cyberdesk._files",
    "Desktop": "cyberdesk._desktop",
    "Shell": "cyberdesk._shell",
    "ExecResult": "cyberdesk._models",
    "ExecEvent": "cyberdesk._models",
    "Started": "cyberdesk._models",
    "Stdout": "cyberdesk._models",
    "Stderr": "cyberdesk._models",
    "Exited": "cyberdesk._models",
    "FileInfo": "cyberdesk._models",
    "FsEvent": "cyberdesk._models",
    "UploadResult": "cyberdesk._models",
    "Screenshot": "cyberdesk._models",
    "Snapshot": "cyberdesk._models",
    "ApiKey": "cyberdesk._models",
    "ProcessInfo": "cyberdesk._models",
    "CyberdeskError": "cyberdesk._errors",
    "ConfigurationError": "cyberdesk._errors",
    "InvalidArgument": "cyberdesk._errors",
    "NotFound": "cyberdesk._errors",
    "AlreadyExists": "cyberdesk._errors",
    "PermissionDenied": "cyberdesk._errors",
    "Unauthenticated": "cyberdesk._errors",
    "RateLimited": "cyberdesk._errors",
    "FailedPrecondition": "cyberdesk._errors",
    "Unavailable": "cyberdesk._errors",
    "DeadlineExceeded": "cyberdesk._errors",
    "Cancelled": "cyberdesk._errors",
    "DataLoss": "cyberdesk._errors",
    "InternalError": "cyberdesk._errors",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from cyberdesk._async_client import (
        AsyncCyberdesk,
        AsyncDesktop,
        AsyncFiles,
        AsyncInstance,
        AsyncProcess,
        AsyncShell,
    )
    from cyberdesk._client import Cyberdesk, Instances, Keys, Snapshots
    from cyberdesk._desktop import Desktop
    from cyberdesk._errors import (
        AlreadyExists,
        Cancelled,
        ConfigurationError,
        CyberdeskError,
        DataLoss,
        DeadlineExceeded,
        FailedPrecondition,
        InternalError,
        InvalidArgument,
        NotFound,
        PermissionDenied,
        RateLimited,
        Unauthenticated,
        Unavailable,
    )
    from cyberdesk._files import Files, Watch
    from cyberdesk._instance import Instance, Process
    from cyberdesk._models import (
        ApiKey,
        ExecEvent,
        ExecResult,
        Exited,
        FileInfo,
        FsEvent,
        ProcessInfo,
        Screenshot,
        Snapshot,
        Started,
        Stderr,
        Stdout,
        UploadResult,
    )
    from cyberdesk._shell import Shell


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cyberdesk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
