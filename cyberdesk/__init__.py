"""Cyberdesk: cloud desktops and sandboxes for AI agents. The Python SDK.

    from cyberdesk import Cyberdesk

    client = Cyberdesk()  # CYBERDESK_API_KEY / CYBERDESK_ENDPOINT, or the file `cyberdesk up` writes
    with client.instances.create() as box:
        print(box.exec("echo hello").stdout_text)

Every public name is loaded lazily (PEP 562), so `import cyberdesk` costs nothing until a name is
used (the CLI starts faster, and `keep_large_blocks` can be had without loading grpc).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Cyberdesk": "cyberdesk._sync.client",
    "Instances": "cyberdesk._sync.client",
    "Snapshots": "cyberdesk._sync.snapshots",
    "Keys": "cyberdesk._sync.keys",
    "Instance": "cyberdesk._sync.instance",
    "Process": "cyberdesk._sync.process",
    "Files": "cyberdesk._sync.files",
    "Watch": "cyberdesk._sync.files",
    "Desktop": "cyberdesk._sync.desktop",
    "Shell": "cyberdesk._sync.shell",
    "Ports": "cyberdesk._sync.ports",
    "InstanceWatch": "cyberdesk._sync.watch",
    "AsyncCyberdesk": "cyberdesk._async.client",
    "AsyncInstances": "cyberdesk._async.client",
    "AsyncSnapshots": "cyberdesk._async.snapshots",
    "AsyncKeys": "cyberdesk._async.keys",
    "AsyncInstance": "cyberdesk._async.instance",
    "AsyncProcess": "cyberdesk._async.process",
    "AsyncFiles": "cyberdesk._async.files",
    "AsyncWatch": "cyberdesk._async.files",
    "AsyncDesktop": "cyberdesk._async.desktop",
    "AsyncShell": "cyberdesk._async.shell",
    "AsyncPorts": "cyberdesk._async.ports",
    "AsyncInstanceWatch": "cyberdesk._async.watch",
    "InstanceEvent": "cyberdesk._watch",
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
    "PreviewLink": "cyberdesk._models",
    "DesktopViewerLink": "cyberdesk._models",
    "EgressPolicy": "cyberdesk._models",
    "Usage": "cyberdesk._models",
    "InstanceUsage": "cyberdesk._models",
    "UsageReport": "cyberdesk._models",
    "Plan": "cyberdesk._models",
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
    "keep_large_blocks": "cyberdesk._malloc",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from cyberdesk._async.client import AsyncCyberdesk as AsyncCyberdesk
    from cyberdesk._async.client import AsyncInstances as AsyncInstances
    from cyberdesk._async.desktop import AsyncDesktop as AsyncDesktop
    from cyberdesk._async.files import AsyncFiles as AsyncFiles
    from cyberdesk._async.files import AsyncWatch as AsyncWatch
    from cyberdesk._async.instance import AsyncInstance as AsyncInstance
    from cyberdesk._async.keys import AsyncKeys as AsyncKeys
    from cyberdesk._async.ports import AsyncPorts as AsyncPorts
    from cyberdesk._async.process import AsyncProcess as AsyncProcess
    from cyberdesk._async.shell import AsyncShell as AsyncShell
    from cyberdesk._async.snapshots import AsyncSnapshots as AsyncSnapshots
    from cyberdesk._async.watch import AsyncInstanceWatch as AsyncInstanceWatch
    from cyberdesk._errors import AlreadyExists as AlreadyExists
    from cyberdesk._errors import Cancelled as Cancelled
    from cyberdesk._errors import ConfigurationError as ConfigurationError
    from cyberdesk._errors import CyberdeskError as CyberdeskError
    from cyberdesk._errors import DataLoss as DataLoss
    from cyberdesk._errors import DeadlineExceeded as DeadlineExceeded
    from cyberdesk._errors import FailedPrecondition as FailedPrecondition
    from cyberdesk._errors import InternalError as InternalError
    from cyberdesk._errors import InvalidArgument as InvalidArgument
    from cyberdesk._errors import NotFound as NotFound
    from cyberdesk._errors import PermissionDenied as PermissionDenied
    from cyberdesk._errors import RateLimited as RateLimited
    from cyberdesk._errors import Unauthenticated as Unauthenticated
    from cyberdesk._errors import Unavailable as Unavailable
    from cyberdesk._malloc import keep_large_blocks as keep_large_blocks
    from cyberdesk._models import ApiKey as ApiKey
    from cyberdesk._models import DesktopViewerLink as DesktopViewerLink
    from cyberdesk._models import EgressPolicy as EgressPolicy
    from cyberdesk._models import ExecEvent as ExecEvent
    from cyberdesk._models import ExecResult as ExecResult
    from cyberdesk._models import Exited as Exited
    from cyberdesk._models import FileInfo as FileInfo
    from cyberdesk._models import FsEvent as FsEvent
    from cyberdesk._models import InstanceUsage as InstanceUsage
    from cyberdesk._models import Plan as Plan
    from cyberdesk._models import PreviewLink as PreviewLink
    from cyberdesk._models import ProcessInfo as ProcessInfo
    from cyberdesk._models import Screenshot as Screenshot
    from cyberdesk._models import Snapshot as Snapshot
    from cyberdesk._models import Started as Started
    from cyberdesk._models import Stderr as Stderr
    from cyberdesk._models import Stdout as Stdout
    from cyberdesk._models import UploadResult as UploadResult
    from cyberdesk._models import Usage as Usage
    from cyberdesk._models import UsageReport as UsageReport
    from cyberdesk._sync.client import Cyberdesk as Cyberdesk
    from cyberdesk._sync.client import Instances as Instances
    from cyberdesk._sync.desktop import Desktop as Desktop
    from cyberdesk._sync.files import Files as Files
    from cyberdesk._sync.files import Watch as Watch
    from cyberdesk._sync.instance import Instance as Instance
    from cyberdesk._sync.keys import Keys as Keys
    from cyberdesk._sync.ports import Ports as Ports
    from cyberdesk._sync.process import Process as Process
    from cyberdesk._sync.shell import Shell as Shell
    from cyberdesk._sync.snapshots import Snapshots as Snapshots
    from cyberdesk._sync.watch import InstanceWatch as InstanceWatch
    from cyberdesk._watch import InstanceEvent as InstanceEvent


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cyberdesk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
