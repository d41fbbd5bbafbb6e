"""Keep glibc malloc from handing large freed blocks back to the kernel at once.

A process that moves megabyte-sized gRPC messages allocates and frees several 1 MiB blocks per
message (protobuf arena, serialised bytes, gRPC slices). With glibc's defaults a freed block of
that size is unmapped or trimmed off the heap straight away, and the next one is mapped again and
faulted in page by page. On the 2-core VM the benchmarks run on, that costs about 1.3 ms per MiB:
building and serialising a 1 MiB DownloadFileResponse took 1.4 ms instead of 0.07 ms, and a bare
gRPC server stream of 1 MiB protobuf messages (grpc.aio server, sync client, unix socket) ran at
~500 MB/s instead of ~1,370 MB/s.

`keep_large_blocks()` raises the mmap threshold (blocks up to 32 MiB, the most glibc allows, come
from the heap) and the trim threshold, so freed blocks are reused. The price is that the process
keeps up to `trim_mib` of freed heap mapped after a burst of traffic.

It lives in the SDK because both sides need it: a host program (the CLI's `cp`, an agent moving
large files) and every service (`cyberdesk_common.service`, the guest agent). The SDK does not call
it on import: tuning malloc is the host program's choice.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

_log = logging.getLogger(__name__)

# From glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses a larger mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024

_applied = False


def keep_large_blocks(trim_mib: int = 64) -> bool:
    """Tune glibc malloc for large messages (once per process); False where it is not glibc."""
    global _applied
    if _applied:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False  # musl, macOS...: no mallopt, and no such cost to remove.
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok: bool = mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, trim_mib * 1024 * 1024) == 1 and ok
    if not ok:
        _log.warning("mallopt refused the large-message settings; transfers will be slower")
    _applied = bool(ok)
    return _applied
