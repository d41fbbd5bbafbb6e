"""How filesystem calls fail: the errno -> gRPC status table, and the check of a request's path.

Every OSError raised by a filesystem call (transfers, tree operations, watches) goes through
`os_error`, so that one table decides which gRPC status a failure becomes and every message names
the path concerned.
"""

from __future__ import annotations

import errno
import os

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from cyberdesk_common.status import RpcError, invalid_argument
from guest_agent.process_cgroups import limit_text

# errno -> (status, what a person should understand). Anything missing here becomes UNKNOWN with
# the system's own text, never INTERNAL: the request reached the disk and the disk said no.
_ERRNO: dict[int, tuple[grpc.StatusCode, str]] = {
    errno.ENOENT: (grpc.StatusCode.NOT_FOUND, "no such file or directory"),
    errno.EEXIST: (grpc.StatusCode.ALREADY_EXISTS, "already exists"),
    errno.EACCES: (grpc.StatusCode.PERMISSION_DENIED, "permission denied"),
    errno.EPERM: (grpc.StatusCode.PERMISSION_DENIED, "operation not permitted"),
    # FAILED_PRECONDITION, not PERMISSION_DENIED: no credential would help; the place is mounted
    # read-only (/usr in a sandbox) and the caller must write elsewhere.
    errno.EROFS: (grpc.StatusCode.FAILED_PRECONDITION, "read-only file system"),
    errno.ENOTDIR: (grpc.StatusCode.FAILED_PRECONDITION, "not a directory (a path component is a file)"),
    errno.EISDIR: (grpc.StatusCode.FAILED_PRECONDITION, "is a directory, a file was expected"),
    errno.ENOTEMPTY: (grpc.StatusCode.FAILED_PRECONDITION, "directory not empty (set recursive to remove it)"),
    errno.EBUSY: (grpc.StatusCode.FAILED_PRECONDITION, "busy (a mount point or in use)"),
    errno.ETXTBSY: (grpc.StatusCode.FAILED_PRECONDITION, "a running program's file"),
    errno.EXDEV: (grpc.StatusCode.FAILED_PRECONDITION, "on another file system"),
    errno.ENOSPC: (grpc.StatusCode.RESOURCE_EXHAUSTED, "no space left on device"),
    errno.EDQUOT: (grpc.StatusCode.RESOURCE_EXHAUSTED, "disk quota exceeded"),
    errno.EFBIG: (grpc.StatusCode.RESOURCE_EXHAUSTED, "file too large"),
    errno.EMFILE: (grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open files in the agent"),
    errno.ENFILE: (grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open files in the instance"),
    errno.ENAMETOOLONG: (grpc.StatusCode.INVALID_ARGUMENT, "name too long"),
    errno.ELOOP: (grpc.StatusCode.INVALID_ARGUMENT, "too many levels of symbolic links"),
    errno.EINVAL: (grpc.StatusCode.INVALID_ARGUMENT, "invalid (e.g. a directory moved into itself)"),
    errno.EIO: (grpc.StatusCode.UNAVAILABLE, "input/output error on the device"),
    # A fork or clone (a thread, a helper process) refused: the instance's pids limit is reached.
    errno.EAGAIN: (grpc.StatusCode.RESOURCE_EXHAUSTED, "resource temporarily unavailable"),
}


def disk_full(text: str) -> str:
    """What a full disk (ENOSPC/EDQUOT, the system's `text`) is called: the instance's disk, with its size.

    The runtime passes the size as CYBERDESK_AGENT_DISK_MIB (the local runtime's disks are file
    systems of that size, so ENOSPC means the instance's own limit, not the host's disk). An agent
    the runtime told nothing (a test's, a VM's without the variable) says the system's text only.
    """
    size = os.environ.get("CYBERDESK_AGENT_DISK_MIB", "")
    return f"the instance's disk ({size} MiB) is full ({text})" if size.isdigit() else text


# google.rpc.ErrorInfo of a full disk: RESOURCE_EXHAUSTED also means a rate limit, after which
# waiting helps; a full disk needs room made, so the REST face answers 507, not 429.
DISK_FULL_REASON = "DISK_FULL"
ERROR_DOMAIN = "cyberdesk.dev"


def disk_full_info() -> any_pb2.Any:
    """The ErrorInfo detail carried by a full disk's RESOURCE_EXHAUSTED."""
    info = error_details_pb2.ErrorInfo(reason=DISK_FULL_REASON, domain=ERROR_DOMAIN)
    size = os.environ.get("CYBERDESK_AGENT_DISK_MIB", "")
    if size.isdigit():
        info.metadata["disk_mib"] = size
    detail = any_pb2.Any()
    detail.Pack(info)
    return detail


def os_error(err: OSError, path: str, action: str) -> RpcError:
    """The status of a failed filesystem call: `action` ("open", "remove", ...) on `path` failed with `err`."""
    code, text = _ERRNO.get(err.errno or 0, (grpc.StatusCode.UNKNOWN, err.strerror or str(err)))
    details = []
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        text = disk_full(text)
        details.append(disk_full_info())
    if err.errno == errno.EAGAIN:
        text = f"{text}: the instance may have reached {limit_text()}"
    return RpcError(code, f"cannot {action} {path}: {text}", details)


def require_absolute(path: str, field: str) -> str:
    """`path` normalised (no `..`, no trailing slash), or INVALID_ARGUMENT naming `field`."""
    if not path:
        raise invalid_argument(f"{field} is required (an absolute path such as /home/user/file.txt)")
    if "\x00" in path:
        raise invalid_argument(f"{field} contains a NUL byte")
    if not path.startswith("/"):
        raise invalid_argument(f"{field} must be an absolute path (starting with /), got {path!r}")
    # normpath does not touch the disk; "//x" stays "//x" in POSIX, so strip leading doubles too.
    normal = os.path.normpath(path)
    return "/" + normal.lstrip("/")
