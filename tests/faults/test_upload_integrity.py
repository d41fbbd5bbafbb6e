"""An upload that does not finish never changes its target: killed callers, a killed gateway, cancels.

Real processes only: instance_svc with a real sandbox, the gateway in front, and callers that are
separate Python processes killed with SIGKILL between two messages (the kernel closes their socket;
no END_STREAM is ever sent). The agent commits only on the caller's trailer (size and sha256) and
the gateway cancels an upload stream that ended without one, so every case below must leave the
old content, read back through the gateway and compared by sha256.

A kill -9'd caller reaches the gateway as a clean end of its request stream followed, a moment
later, by the cancellation of the call (grpc.aio; seen with a bare server): whether a relayed
half-close or the cancel reaches the agent first is a race, which the stream without a trailer
below stages deterministically.

Each interrupted upload is named (`upload_id`), which gives a sync point: StatUpload answers
ABORTED while the agent still holds that upload and the stored size once it has let it go, so the
check runs after the agent has decided, never after a sleep.
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest

from cyberdesk import (
    Cyberdesk,
    CyberdeskError,
    FailedPrecondition,
    Instance,
    InternalError,
    InvalidArgument,
    PermissionDenied,
    RateLimited,
)
from cyberdesk._requests import upload_trailer
from cyberdesk_proto.v1 import filesystem_pb2 as fs
from cyberdesk_proto.v1 import filesystem_pb2_grpc
from gateway_svc.proxy import UNFINISHED
from tests.faults.stack import Stack
from tests.support.procs import ROOT

TENANT = "t-uploads"

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024
OLD = b"old content\n"
TARGET = "/home/user/target.bin"

# The child: a caller that sends the header and `count` 1 MiB chunks of an upload through the
# gateway, says so on stdout, then blocks between two messages until it is killed.
_CHILD = """
import os, sys, threading, grpc
from cyberdesk_proto.v1 import filesystem_pb2 as fs, filesystem_pb2_grpc
endpoint, key, instance_id, path, upload_id, count = sys.argv[1:7]
def requests():
    header = fs.UploadFileHeader(path=path, overwrite=True, upload_id=upload_id)
    yield fs.UploadFileRequest(instance_id=instance_id, header=header)
    block = os.urandom(1024 * 1024)
    for _ in range(int(count)):
        yield fs.UploadFileRequest(chunk=block)
    print("sent", flush=True)
    threading.Event().wait()
with grpc.insecure_channel(endpoint) as channel:
    filesystem_pb2_grpc.FilesystemServiceStub(channel).UploadFile(
        requests(), metadata=(("authorization", "Bearer " + key),), timeout=120
    )
"""


def _metadata(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _stat_upload(stack: Stack, key: str, instance_id: str, upload_id: str) -> int | None:
    """None while the agent holds upload `upload_id`; then the bytes it kept (-1: none)."""
    request = fs.StatUploadRequest(instance_id=instance_id, path=TARGET, upload_id=upload_id)
    with grpc.insecure_channel(stack.gateway.addr) as channel:
        try:
            reply = filesystem_pb2_grpc.FilesystemServiceStub(channel).StatUpload(
                request, metadata=_metadata(key), timeout=10
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return -1
            # ABORTED: the agent still holds the upload; UNAVAILABLE: a gateway coming back.
            if err.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE):
                return None
            raise
    return int(reply.stored_size)


def _until(what: str, check: object, seconds: float = 60) -> object:
    deadline = time.monotonic() + seconds
    while (result := check()) in (None, False):  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return result


def _active(stack: Stack, key: str, instance_id: str, upload_id: str) -> None:
    """Wait until the agent holds upload `upload_id` (its bytes are flowing)."""
    _until(f"upload {upload_id} to reach the agent", lambda: _stat_upload(stack, key, instance_id, upload_id) is None)


def _settled(stack: Stack, key: str, instance_id: str, upload_id: str) -> int:
    """Wait until the agent has let upload `upload_id` go; the bytes it kept (-1: none kept)."""
    stored = _until(f"the agent to let upload {upload_id} go", lambda: _stat_upload(stack, key, instance_id, upload_id))
    assert isinstance(stored, int)
    return stored


def _content_sha(box: Instance) -> str:
    return hashlib.sha256(box.files.read(TARGET)).hexdigest()


def _start_child(stack: Stack, key: str, box: Instance, upload_id: str, count: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, stack.gateway.addr, key, box.id, TARGET, upload_id, str(count)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
    )


def _wait_line(proc: subprocess.Popen[bytes], seconds: float = 60) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    assert ready, "the child did not report its chunks sent"
    return proc.stdout.readline()


def test_a_caller_killed_between_messages_never_changes_the_target(stack: Stack, key: str, box: Instance) -> None:
    box.files.write(TARGET, OLD)
    old = hashlib.sha256(OLD).hexdigest()
    rng = random.Random(12)
    kept = []
    for attempt in range(10):
        upload_id = f"killed-{attempt:02d}-{rng.randrange(1 << 30):08x}"
        count = rng.randint(1, 24)
        child = _start_child(stack, key, box, upload_id, count)
        try:
            assert _wait_line(child) == b"sent\n"
            _active(stack, key, box.id, upload_id)
        finally:
            child.kill()  # SIGKILL: no cancel, no END_STREAM; the kernel closes the socket
            child.wait()
        kept.append(_settled(stack, key, box.id, upload_id))
        assert _content_sha(box) == old, f"attempt {attempt}: changed by a caller dead after {count} MiB"
    # The agent received bytes (the test exercised the danger, not an empty stream): a named upload keeps them.
    assert max(kept) > 0, kept


def test_a_gateway_killed_mid_upload_leaves_the_old_content(stack: Stack, key: str, box: Instance) -> None:
    box.files.write(TARGET, OLD)
    sent = threading.Event()
    failure: list[BaseException] = []

    def requests() -> Iterator[fs.UploadFileRequest]:
        header = fs.UploadFileHeader(path=TARGET, overwrite=True, upload_id="gateway-killed-1")
        yield fs.UploadFileRequest(instance_id=box.id, header=header)
        for _ in range(8):
            yield fs.UploadFileRequest(chunk=os.urandom(MiB))
        sent.set()
        threading.Event().wait(120)

    def upload() -> None:
        with grpc.insecure_channel(stack.gateway.addr) as channel:
            try:
                filesystem_pb2_grpc.FilesystemServiceStub(channel).UploadFile(
                    requests(), metadata=_metadata(key), timeout=120
                )
            except grpc.RpcError as err:
                failure.append(err)

    caller = threading.Thread(target=upload, daemon=True)
    caller.start()
    assert sent.wait(60)
    _active(stack, key, box.id, "gateway-killed-1")
    stack.gateway.kill9()
    caller.join(60)
    stack.gateway.start()
    assert failure and failure[0].code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert _settled(stack, key, box.id, "gateway-killed-1") >= 0
    assert box.files.read(TARGET) == OLD


def test_a_cancelled_upload_leaves_the_old_content(stack: Stack, key: str, box: Instance) -> None:
    box.files.write(TARGET, OLD)
    sent = threading.Event()
    release = threading.Event()

    def requests() -> Iterator[fs.UploadFileRequest]:
        header = fs.UploadFileHeader(path=TARGET, overwrite=True, upload_id="cancelled-01")
        yield fs.UploadFileRequest(instance_id=box.id, header=header)
        for _ in range(4):
            yield fs.UploadFileRequest(chunk=os.urandom(MiB))
        sent.set()
        release.wait(60)

    with grpc.insecure_channel(stack.gateway.addr) as channel:
        future = filesystem_pb2_grpc.FilesystemServiceStub(channel).UploadFile.future(
            requests(), metadata=_metadata(key), timeout=60
        )
        assert sent.wait(60)
        _active(stack, key, box.id, "cancelled-01")
        future.cancel()
        release.set()
        with pytest.raises(grpc.FutureCancelledError):
            future.result()
    _settled(stack, key, box.id, "cancelled-01")
    assert box.files.read(TARGET) == OLD


def test_a_stream_that_ends_without_a_trailer_is_aborted(stack: Stack, key: str, box: Instance) -> None:
    """A clean end of the request stream is not a finished upload (an older client, a half-close relayed)."""
    box.files.write(TARGET, OLD)
    messages = [
        fs.UploadFileRequest(instance_id=box.id, header=fs.UploadFileHeader(path=TARGET, overwrite=True)),
        fs.UploadFileRequest(chunk=b"half a file"),
    ]
    with grpc.insecure_channel(stack.gateway.addr) as channel, pytest.raises(grpc.RpcError) as err:
        filesystem_pb2_grpc.FilesystemServiceStub(channel).UploadFile(
            iter(messages), metadata=_metadata(key), timeout=30
        )
    # The gateway's own words: it cancelled the agent's call rather than pass the end on as a half-close.
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.ABORTED, UNFINISHED)
    assert box.files.read(TARGET) == OLD


def test_a_trailer_with_the_wrong_sha256_is_data_loss(stack: Stack, key: str, box: Instance) -> None:
    box.files.write(TARGET, OLD)
    data = os.urandom(3 * MiB)
    messages = [
        fs.UploadFileRequest(instance_id=box.id, header=fs.UploadFileHeader(path=TARGET, overwrite=True)),
        *(fs.UploadFileRequest(chunk=data[i : i + MiB]) for i in range(0, len(data), MiB)),
        upload_trailer(len(data), hashlib.sha256(data + b"!").hexdigest()),
    ]
    with grpc.insecure_channel(stack.gateway.addr) as channel, pytest.raises(grpc.RpcError) as err:
        filesystem_pb2_grpc.FilesystemServiceStub(channel).UploadFile(
            iter(messages), metadata=_metadata(key), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.DATA_LOSS, err.value.details()
    assert box.files.read(TARGET) == OLD


def test_a_rest_body_cut_short_leaves_the_old_content(stack: Stack, key: str, box: Instance) -> None:
    """PUT with a Content-Length the client never reaches: the gateway sends no trailer, nothing is committed."""
    box.files.write(TARGET, OLD)
    host, port = stack.gateway.http.rsplit(":", 1)
    head = (
        f"PUT /v1/instances/{box.id}/files{TARGET}?overwrite=true&uploadId=rest-cut-01 HTTP/1.1\r\n"
        f"Host: {host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {8 * MiB}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + os.urandom(3 * MiB))
        _active(stack, key, box.id, "rest-cut-01")
    _settled(stack, key, box.id, "rest-cut-01")
    assert box.files.read(TARGET) == OLD


def _refused_write(box: Instance, path: str, data: bytes = b"data") -> CyberdeskError:
    """The error of a write the instance refuses after the upload's header.

    A known race on the SDK's own hop: when the gateway ends an upload with an error while the
    SDK's grpc.aio call is still writing the next message, grpc may end that call with INTERNAL
    "Internal error from Core" instead of the gateway's status (the gateway's own hops to the agent
    keep the real status: `cyberdesk._client_stream`). That one answer is tried again (up to
    3 times), so this test checks the errno mapping and stays deterministic.
    """
    for _ in range(3):
        try:
            box.files.write(path, data)
        except InternalError as err:
            if "Internal error from Core" not in str(err):
                return err
            continue
        except CyberdeskError as err:
            return err
        raise AssertionError(f"writing {path} succeeded")
    raise AssertionError(f"writing {path}: INTERNAL three times in a row")


def _refused_put(url: str, key: str, data: bytes) -> httpx.Response:
    """A REST PUT the instance refuses (no retry: the gateway keeps the agent's status, see above)."""
    return httpx.put(url, content=data, headers={"authorization": f"Bearer {key}"}, timeout=60)


def test_file_errors_through_the_gateway_say_what_they_are(stack: Stack, key: str, box: Instance) -> None:
    """A refused write names its cause and the path inside the instance, over gRPC (SDK) and REST alike.

    Here rather than in a file of its own: it needs the same real sandbox (a read-only /usr, a
    non-root user), and a second stack would double the test's start-up.
    """
    made = box.exec(
        "ln -sfn /usr/lib /home/user/into-usr && ln -sfn /usr/bin/env /home/user/env-link"
        " && mkdir -p /home/user/locked && chmod 555 /home/user/locked"
    )
    assert made.exit_code == 0, made.stderr
    cases = [
        ("/usr/x", FailedPrecondition, "cannot write /usr/x: read-only file system", 400),
        ("/home/user/into-usr/x", FailedPrecondition, "cannot write /home/user/into-usr/x: read-only file system", 400),
        ("/home/user/env-link", FailedPrecondition, "cannot write /usr/bin/env: read-only file system", 400),
        ("/home/user/locked/x", PermissionDenied, "cannot write /home/user/locked/x: permission denied", 403),
        ("/home/user/" + "n" * 300, InvalidArgument, "name too long", 400),
    ]
    host = stack.gateway.http
    for path, error, text, status in cases:
        refused = _refused_write(box, path)
        assert isinstance(refused, error) and text in str(refused), (path, repr(refused))
        reply = _refused_put(f"http://{host}/v1/instances/{box.id}/files{path}?overwrite=true", key, b"data")
        body = reply.json()
        assert (reply.status_code, body["code"]) == (status, error.code.value[0]), (path, reply.text)
        assert text in body["message"], (path, body)
    with pytest.raises(FailedPrecondition, match="cannot create directory /usr/d: read-only file system"):
        box.files.make_dir("/usr/d")
    with pytest.raises(FailedPrecondition, match="read-only file system"):
        box.files.remove("/usr/lib")


def test_a_full_disk_is_resource_exhausted_over_grpc_and_507_over_rest(stack: Stack, key: str) -> None:
    """Not 429: a client told to wait and retry would only fill the same disk again."""
    with Cyberdesk(api_key=key, endpoint=stack.gateway.addr, timeout=60) as client:
        small = client.instances.create(timeout=600, disk_mib=256)
        try:
            filled = small.exec(
                "avail=$(df --output=avail -k /home/user | tail -1);"
                " head -c $(( (avail - 1024) * 1024 )) /dev/zero > /home/user/fill"
            )
            assert filled.exit_code == 0, filled.stderr
            small.files.write("/home/user/small.txt", b"old")
            refused = _refused_write(small, "/home/user/small.txt", os.urandom(8 * MiB))
            assert isinstance(refused, RateLimited), repr(refused)
            assert "cannot write /home/user/small.txt: the instance's disk (256 MiB) is full" in str(refused)
            reply = _refused_put(
                f"http://{stack.gateway.http}/v1/instances/{small.id}/files/home/user/small.txt?overwrite=true",
                key,
                os.urandom(8 * MiB),
            )
            body = reply.json()
            assert (reply.status_code, body["code"]) == (507, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]), reply.text
            assert "is full" in body["message"] and "retry-after" not in reply.headers
            assert {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "DISK_FULL"}.items() <= body[
                "details"
            ][0].items()
            assert small.files.read("/home/user/small.txt") == b"old"
        finally:
            small.delete()
