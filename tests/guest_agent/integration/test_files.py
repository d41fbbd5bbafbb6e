"""FilesystemService against a real agent process: transfers, errors, atomicity, resume."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from cyberdesk_proto.v1 import filesystem_pb2 as fs
from cyberdesk_proto.v1 import filesystem_pb2_grpc
from tests.guest_agent.integration.conftest import RunningAgent

Stub = filesystem_pb2_grpc.FilesystemServiceStub
MiB = 1024 * 1024


def _stub(agent: RunningAgent) -> Stub:
    return filesystem_pb2_grpc.FilesystemServiceStub(agent.channel)


def _messages(
    agent: RunningAgent, header: fs.UploadFileHeader, chunks: Iterator[bytes], prefix: bytes = b""
) -> Iterator[fs.UploadFileRequest]:
    """Header, chunks, then the trailer of the whole file (`prefix`: what a resumed upload stored before)."""
    yield fs.UploadFileRequest(instance_id=agent.instance_id, header=header)
    digest = hashlib.sha256(prefix)
    size = len(prefix)
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
        yield fs.UploadFileRequest(chunk=chunk)
    yield fs.UploadFileRequest(trailer=fs.UploadFileTrailer(size=size, sha256=digest.hexdigest()))


def upload(
    agent: RunningAgent, header: fs.UploadFileHeader, data: bytes, chunk: int = 64 * 1024, prefix: bytes = b""
) -> fs.UploadFileResponse:
    pieces = (data[i : i + chunk] for i in range(0, len(data), chunk))
    reply: fs.UploadFileResponse = _stub(agent).UploadFile(
        _messages(agent, header, pieces, prefix), metadata=agent.metadata, timeout=30
    )
    return reply


def download(agent: RunningAgent, path: str, offset: int = 0, length: int = 0) -> list[fs.DownloadFileResponse]:
    request = fs.DownloadFileRequest(instance_id=agent.instance_id, path=path, offset=offset, length=length)
    return list(_stub(agent).DownloadFile(request, metadata=agent.metadata, timeout=30))


def _code(err: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    code: grpc.StatusCode = err.value.code()
    return code


def _details(err: pytest.ExceptionInfo[grpc.RpcError]) -> str:
    return err.value.details() or ""


def test_upload_then_download_round_trip(bound_agent: RunningAgent, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 17)
    target = tmp_path / "sub" / "data.bin"
    reply = upload(bound_agent, fs.UploadFileHeader(path=str(target), mode=0o600, create_parents=True), data)
    assert reply.size == len(data)
    assert reply.sha256 == hashlib.sha256(data).hexdigest()
    assert reply.path == str(target)
    assert target.read_bytes() == data
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["data.bin"]  # no temporary file left

    messages = download(bound_agent, str(target))
    assert messages[0].total_size == len(data)
    assert b"".join(m.chunk for m in messages) == data
    assert all(not m.sha256 for m in messages[:-1])
    assert messages[-1].sha256 == hashlib.sha256(data).hexdigest()
    assert max(len(m.chunk) for m in messages) <= 1024 * 1024


def test_download_ranges(bound_agent: RunningAgent, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB + 5)
    target = tmp_path / "r.bin"
    target.write_bytes(data)
    for offset, length, expected in [
        (10, 100, data[10:110]),
        (MiB - 3, MiB + 7, data[MiB - 3 : 2 * MiB + 4]),
        (2 * MiB, 0, data[2 * MiB :]),
        (len(data), 0, b""),
        (len(data) - 2, 1000, data[-2:]),
    ]:
        messages = download(bound_agent, str(target), offset, length)
        got = b"".join(m.chunk for m in messages)
        assert got == expected, (offset, length)
        assert messages[0].total_size == len(data)
        assert messages[-1].sha256 == hashlib.sha256(expected).hexdigest()

    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    messages = download(bound_agent, str(empty))
    assert len(messages) == 1 and messages[0].sha256 == hashlib.sha256(b"").hexdigest()


def test_download_errors(bound_agent: RunningAgent, tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_bytes(b"hello")
    cases = [
        (dict(path="relative/f.txt"), grpc.StatusCode.INVALID_ARGUMENT, "path must be an absolute path"),
        (dict(path=""), grpc.StatusCode.INVALID_ARGUMENT, "path is required"),
        (dict(path=str(target), offset=-1), grpc.StatusCode.INVALID_ARGUMENT, "offset must be >= 0"),
        (dict(path=str(target), length=-5), grpc.StatusCode.INVALID_ARGUMENT, "length must be >= 0"),
        (dict(path=str(target), offset=6), grpc.StatusCode.OUT_OF_RANGE, "past the end"),
        (dict(path=str(tmp_path / "missing")), grpc.StatusCode.NOT_FOUND, "missing"),
        (dict(path=str(tmp_path)), grpc.StatusCode.FAILED_PRECONDITION, "is a directory"),
        (dict(path=str(target / "below")), grpc.StatusCode.FAILED_PRECONDITION, "not a directory"),
    ]
    for fields, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            download(bound_agent, **fields)  # type: ignore[arg-type]
        assert (_code(err), text in _details(err)) == (code, True), (fields, _details(err))


def test_upload_errors(bound_agent: RunningAgent, tmp_path: Path) -> None:
    existing = tmp_path / "existing.txt"
    existing.write_bytes(b"old")
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"x")
    cases = [
        (fs.UploadFileHeader(path="x.txt"), grpc.StatusCode.INVALID_ARGUMENT, "header.path must be an absolute path"),
        (fs.UploadFileHeader(path=""), grpc.StatusCode.INVALID_ARGUMENT, "header.path is required"),
        (fs.UploadFileHeader(path=str(existing)), grpc.StatusCode.ALREADY_EXISTS, "set overwrite"),
        (fs.UploadFileHeader(path=str(tmp_path / "no" / "f")), grpc.StatusCode.NOT_FOUND, "set create_parents"),
        (fs.UploadFileHeader(path=str(tmp_path), overwrite=True), grpc.StatusCode.FAILED_PRECONDITION, "directory"),
        (
            fs.UploadFileHeader(path=str(a_file / "f"), create_parents=True),
            grpc.StatusCode.FAILED_PRECONDITION,
            "not a directory",
        ),
        (
            fs.UploadFileHeader(path=str(tmp_path / "u"), upload_id="bad id"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "upload_id",
        ),
        (
            fs.UploadFileHeader(path=str(tmp_path / "u"), offset=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "needs header.upload_id",
        ),
        (
            fs.UploadFileHeader(path=str(tmp_path / "u"), expected_sha256="abc"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sha256",
        ),
        (fs.UploadFileHeader(path=str(tmp_path / "u"), mode=0o170000), grpc.StatusCode.INVALID_ARGUMENT, "header.mode"),
    ]
    for header, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            upload(bound_agent, header, b"new")
        assert (_code(err), text in _details(err)) == (code, True), (header, _details(err))
    assert existing.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "agent", "existing.txt"]

    # The header must come first, once; the instance must be this agent's.
    stub = _stub(bound_agent)
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadFile(iter([fs.UploadFileRequest(chunk=b"x")]), metadata=bound_agent.metadata, timeout=10)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "header" in _details(err)
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadFile(iter([]), metadata=bound_agent.metadata, timeout=10)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    twice = [
        fs.UploadFileRequest(instance_id=bound_agent.instance_id, header=fs.UploadFileHeader(path=str(tmp_path / "t"))),
        fs.UploadFileRequest(header=fs.UploadFileHeader(path=str(tmp_path / "t"))),
    ]
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadFile(iter(twice), metadata=bound_agent.metadata, timeout=10)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "only the first message" in _details(err)
    wrong = [fs.UploadFileRequest(instance_id="i-other", header=fs.UploadFileHeader(path=str(tmp_path / "w")))]
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadFile(iter(wrong), metadata=bound_agent.metadata, timeout=10)
    assert _code(err) == grpc.StatusCode.NOT_FOUND
    assert not (tmp_path / "t").exists() and not (tmp_path / "w").exists()


def test_expected_sha256_mismatch_leaves_nothing(bound_agent: RunningAgent, tmp_path: Path) -> None:
    target = tmp_path / "checked.bin"
    data = os.urandom(300_000)
    with pytest.raises(grpc.RpcError) as err:
        upload(
            bound_agent, fs.UploadFileHeader(path=str(target), expected_sha256="0" * 64, upload_id="checked-1"), data
        )
    assert _code(err) == grpc.StatusCode.DATA_LOSS
    assert hashlib.sha256(data).hexdigest() in _details(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent"]
    good = upload(
        bound_agent,
        fs.UploadFileHeader(path=str(target), expected_sha256=hashlib.sha256(data).hexdigest().upper()),
        data,
    )
    assert good.size == len(data) and target.read_bytes() == data


def test_overwrite_replaces_atomically_and_writes_through_symlinks(bound_agent: RunningAgent, tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    real.write_bytes(b"before")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    reply = upload(bound_agent, fs.UploadFileHeader(path=str(link), overwrite=True), b"after")
    # The link stays a link; the file it points to has the new content (as `echo after > link`).
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes() == b"after"
    assert reply.path == str(real)

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "created-through-link")
    upload(bound_agent, fs.UploadFileHeader(path=str(dangling)), b"new")
    assert (tmp_path / "created-through-link").read_bytes() == b"new" and dangling.is_symlink()


def test_concurrent_uploads_to_different_paths(bound_agent: RunningAgent, tmp_path: Path) -> None:
    payloads = {tmp_path / f"c{i}.bin": os.urandom(2 * MiB + i) for i in range(6)}
    with ThreadPoolExecutor(6) as pool:
        replies = list(
            pool.map(
                lambda item: upload(bound_agent, fs.UploadFileHeader(path=str(item[0])), item[1]), payloads.items()
            )
        )
    for (path, data), reply in zip(payloads.items(), replies, strict=True):
        assert path.read_bytes() == data
        assert reply.sha256 == hashlib.sha256(data).hexdigest()


def _wait_for(predicate: object, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _interrupted_upload(agent: RunningAgent, header: fs.UploadFileHeader, data: bytes, watch_dir: Path) -> None:
    """Send `data`, then cancel the stream once the agent has written all of it to a temporary file."""
    sent = threading.Event()
    release = threading.Event()

    def requests() -> Iterator[fs.UploadFileRequest]:
        yield fs.UploadFileRequest(instance_id=agent.instance_id, header=header)
        for i in range(0, len(data), 64 * 1024):
            yield fs.UploadFileRequest(chunk=data[i : i + 64 * 1024])
        sent.set()
        release.wait(30)

    future = _stub(agent).UploadFile.future(requests(), metadata=agent.metadata, timeout=60)
    assert sent.wait(30)

    def partial_size() -> int:
        temps = [p for p in watch_dir.iterdir() if ".cyberdesk-upload-" in p.name]
        return temps[0].stat().st_size if temps else -1

    _wait_for(lambda: partial_size() == len(data), "the agent to write the sent bytes")
    future.cancel()
    release.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()


def test_interrupted_upload_without_id_leaves_nothing(bound_agent: RunningAgent, tmp_path: Path) -> None:
    target = tmp_path / "gone.bin"
    _interrupted_upload(bound_agent, fs.UploadFileHeader(path=str(target)), os.urandom(MiB), tmp_path)
    _wait_for(lambda: sorted(p.name for p in tmp_path.iterdir()) == ["agent"], "the temporary file to be removed")


def test_interrupted_upload_resumes_with_whole_file_sha256(bound_agent: RunningAgent, tmp_path: Path) -> None:
    data = os.urandom(5 * MiB + 123)
    target = tmp_path / "big.bin"
    header = fs.UploadFileHeader(path=str(target), upload_id="resume-0001", mode=0o640)
    _interrupted_upload(bound_agent, header, data[: 3 * MiB], tmp_path)
    assert not target.exists()

    # Asking for more than what is stored says how much is stored.
    ahead = fs.UploadFileHeader(path=str(target), upload_id="resume-0001", offset=4 * MiB)
    with pytest.raises(grpc.RpcError) as err:
        upload(bound_agent, ahead, data[4 * MiB :])
    assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION and f"resume from offset {3 * MiB}" in _details(err)
    unknown = fs.UploadFileHeader(path=str(target), upload_id="never-started", offset=10)
    with pytest.raises(grpc.RpcError) as err:
        upload(bound_agent, unknown, b"x")
    assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION and "offset 0" in _details(err)

    # Resume a bit before the end of the partial file: the rest is trimmed and rewritten.
    offset = 2 * MiB + 7
    resumed = fs.UploadFileHeader(
        path=str(target),
        upload_id="resume-0001",
        offset=offset,
        mode=0o640,
        expected_sha256=hashlib.sha256(data).hexdigest(),
    )
    reply = upload(bound_agent, resumed, data[offset:], prefix=data[:offset])
    assert reply.size == len(data)
    assert reply.sha256 == hashlib.sha256(data).hexdigest()
    assert target.read_bytes() == data
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent", "big.bin"]


def test_permission_denied_and_disk_full(bound_agent: RunningAgent, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: chattr +i and a tmpfs mount make the kernel refuse writes even to root")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "f").write_bytes(b"x")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["chattr", "+i", str(locked)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        with pytest.raises(grpc.RpcError) as err:
            upload(bound_agent, fs.UploadFileHeader(path=str(locked / "new")), b"data")
        assert _code(err) == grpc.StatusCode.PERMISSION_DENIED, _details(err)
        stub = _stub(bound_agent)
        with pytest.raises(grpc.RpcError) as err:
            stub.RemovePath(
                fs.RemovePathRequest(instance_id=bound_agent.instance_id, path=str(locked / "f")),
                metadata=bound_agent.metadata,
            )
        assert _code(err) == grpc.StatusCode.PERMISSION_DENIED and str(locked / "f") in _details(err)

        with pytest.raises(grpc.RpcError) as err:
            upload(bound_agent, fs.UploadFileHeader(path=str(small / "big")), os.urandom(3 * MiB))
        assert _code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED and "no space left" in _details(err)
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
        subprocess.run(["umount", str(small)], check=True)


def test_stat_list_mkdir_move_remove(bound_agent: RunningAgent, tmp_path: Path) -> None:
    stub, iid, md = _stub(bound_agent), bound_agent.instance_id, bound_agent.metadata
    root = tmp_path / "tree"
    reply = stub.MakeDirectory(
        fs.MakeDirectoryRequest(instance_id=iid, path=str(root / "a" / "b"), parents=True), metadata=md
    )
    assert reply.info.type == fs.FILE_TYPE_DIRECTORY and reply.info.mode == 0o755
    (root / "a" / "b" / "deep.txt").write_bytes(b"deep")
    (root / "top.txt").write_bytes(b"12345")
    (root / "link").symlink_to("top.txt")

    info = stub.StatPath(fs.StatPathRequest(instance_id=iid, path=str(root / "top.txt")), metadata=md).info
    assert (info.type, info.size, info.name) == (fs.FILE_TYPE_FILE, 5, "top.txt")
    assert info.modify_time.ToNanoseconds() == (root / "top.txt").stat().st_mtime_ns
    link = stub.StatPath(fs.StatPathRequest(instance_id=iid, path=str(root / "link")), metadata=md).info
    assert (link.type, link.symlink_target) == (fs.FILE_TYPE_SYMLINK, "top.txt")

    one = stub.ListDirectory(fs.ListDirectoryRequest(instance_id=iid, path=str(root)), metadata=md).entries
    assert [e.path for e in one] == [str(root / n) for n in ("a", "link", "top.txt")]
    three = stub.ListDirectory(
        fs.ListDirectoryRequest(instance_id=iid, path=str(root) + "/", depth=3), metadata=md
    ).entries
    assert [e.path for e in three] == [str(root / p) for p in ("a", "a/b", "a/b/deep.txt", "link", "top.txt")]

    stub.MovePath(
        fs.MovePathRequest(instance_id=iid, source=str(root / "top.txt"), destination=str(root / "moved.txt")),
        metadata=md,
    )
    assert (root / "moved.txt").read_bytes() == b"12345" and not (root / "top.txt").exists()
    (root / "other.txt").write_bytes(b"other")
    with pytest.raises(grpc.RpcError) as err:
        stub.MovePath(
            fs.MovePathRequest(instance_id=iid, source=str(root / "other.txt"), destination=str(root / "moved.txt")),
            metadata=md,
        )
    assert _code(err) == grpc.StatusCode.ALREADY_EXISTS
    moved = stub.MovePath(
        fs.MovePathRequest(
            instance_id=iid, source=str(root / "other.txt"), destination=str(root / "moved.txt"), overwrite=True
        ),
        metadata=md,
    )
    assert moved.info.size == 5 and (root / "moved.txt").read_bytes() == b"other"

    with pytest.raises(grpc.RpcError) as err:
        stub.RemovePath(fs.RemovePathRequest(instance_id=iid, path=str(root / "a")), metadata=md)
    assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION and "recursive" in _details(err)
    stub.RemovePath(fs.RemovePathRequest(instance_id=iid, path=str(root / "a"), recursive=True), metadata=md)
    stub.RemovePath(fs.RemovePathRequest(instance_id=iid, path=str(root / "link")), metadata=md)
    assert sorted(p.name for p in root.iterdir()) == ["moved.txt"]


def test_tree_operation_errors(bound_agent: RunningAgent, tmp_path: Path) -> None:
    stub, iid, md = _stub(bound_agent), bound_agent.instance_id, bound_agent.metadata
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "inner").write_bytes(b"y")
    missing = str(tmp_path / "missing")
    calls = [
        (
            stub.StatPath,
            fs.StatPathRequest(instance_id=iid, path="rel"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "path must be",
        ),
        (stub.StatPath, fs.StatPathRequest(instance_id=iid, path=missing), grpc.StatusCode.NOT_FOUND, missing),
        (stub.StatPath, fs.StatPathRequest(instance_id="i-x", path=missing), grpc.StatusCode.NOT_FOUND, "i-x"),
        (stub.StatPath, fs.StatPathRequest(path=missing), grpc.StatusCode.INVALID_ARGUMENT, "instance_id"),
        (
            stub.ListDirectory,
            fs.ListDirectoryRequest(instance_id=iid, path=missing),
            grpc.StatusCode.NOT_FOUND,
            missing,
        ),
        (
            stub.ListDirectory,
            fs.ListDirectoryRequest(instance_id=iid, path=str(tmp_path / "file")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "not a directory",
        ),
        (
            stub.ListDirectory,
            fs.ListDirectoryRequest(instance_id=iid, path=str(tmp_path), depth=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "depth",
        ),
        (
            stub.MakeDirectory,
            fs.MakeDirectoryRequest(instance_id=iid, path=str(tmp_path / "dir")),
            grpc.StatusCode.ALREADY_EXISTS,
            "already exists",
        ),
        (
            stub.MakeDirectory,
            fs.MakeDirectoryRequest(instance_id=iid, path=str(tmp_path / "file"), parents=True),
            grpc.StatusCode.FAILED_PRECONDITION,
            "not a directory",
        ),
        (
            stub.MakeDirectory,
            fs.MakeDirectoryRequest(instance_id=iid, path=str(tmp_path / "x" / "y")),
            grpc.StatusCode.NOT_FOUND,
            "set parents",
        ),
        (
            stub.MakeDirectory,
            fs.MakeDirectoryRequest(instance_id=iid, path=""),
            grpc.StatusCode.INVALID_ARGUMENT,
            "path is required",
        ),
        (
            stub.MovePath,
            fs.MovePathRequest(instance_id=iid, source=missing, destination=str(tmp_path / "z")),
            grpc.StatusCode.NOT_FOUND,
            missing,
        ),
        (
            stub.MovePath,
            fs.MovePathRequest(instance_id=iid, source=str(tmp_path / "file"), destination="z"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "destination",
        ),
        (
            stub.MovePath,
            fs.MovePathRequest(
                instance_id=iid, source=str(tmp_path / "file"), destination=str(tmp_path / "dir"), overwrite=True
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "directory",
        ),
        (
            stub.MovePath,
            fs.MovePathRequest(
                instance_id=iid, source=str(tmp_path / "dir"), destination=str(tmp_path / "file"), overwrite=True
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "directory",
        ),
        (
            stub.MovePath,
            fs.MovePathRequest(
                instance_id=iid, source=str(tmp_path / "dir"), destination=str(tmp_path / "dir" / "sub")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "into itself",
        ),
        (
            stub.MovePath,
            fs.MovePathRequest(instance_id=iid, source=str(tmp_path / "file"), destination=str(tmp_path / "no" / "f")),
            grpc.StatusCode.NOT_FOUND,
            "does not exist",
        ),
        (stub.RemovePath, fs.RemovePathRequest(instance_id=iid, path=missing), grpc.StatusCode.NOT_FOUND, missing),
        (
            stub.RemovePath,
            fs.RemovePathRequest(instance_id=iid, path="/", recursive=True),
            grpc.StatusCode.INVALID_ARGUMENT,
            "refusing",
        ),
        (
            stub.RemovePath,
            fs.RemovePathRequest(instance_id=iid, path=str(tmp_path / "dir")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "not empty",
        ),
    ]
    for method, request, code, text in calls:
        with pytest.raises(grpc.RpcError) as err:
            method(request, metadata=md, timeout=10)
        assert (_code(err), text in _details(err)) == (code, True), (request, _details(err))
    assert (tmp_path / "dir" / "inner").exists() and (tmp_path / "file").exists()


def _peak_rss(agent: RunningAgent) -> int:
    for line in Path(f"/proc/{agent.service.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def _pattern_chunks(total: int, size: int) -> Iterator[bytes]:
    """`total` bytes in chunks of `size`: a random block stamped with its index, so each chunk differs."""
    block = bytearray(os.urandom(size))
    sent = 0
    index = 0
    while sent < total:
        block[:8] = index.to_bytes(8, "little")
        piece = bytes(block[: min(size, total - sent)])
        yield piece
        sent += len(piece)
        index += 1


def test_1gib_round_trip_with_sha256(bound_agent: RunningAgent, tmp_path: Path) -> None:
    total = 1024 * MiB
    digest = hashlib.sha256()
    peak_before = _peak_rss(bound_agent)

    def hashed() -> Iterator[bytes]:
        for chunk in _pattern_chunks(total, MiB):
            digest.update(chunk)
            yield chunk

    target = tmp_path / "large.bin"
    reply = _stub(bound_agent).UploadFile(
        _messages(bound_agent, fs.UploadFileHeader(path=str(target)), hashed()),
        metadata=bound_agent.metadata,
        timeout=100,
    )
    assert reply.size == total and reply.sha256 == digest.hexdigest()
    received = hashlib.sha256()
    size = 0
    last = ""
    for message in _stub(bound_agent).DownloadFile(
        fs.DownloadFileRequest(instance_id=bound_agent.instance_id, path=str(target)),
        metadata=bound_agent.metadata,
        timeout=100,
    ):
        received.update(message.chunk)
        size += len(message.chunk)
        last = message.sha256 or last
    assert size == total and received.hexdigest() == digest.hexdigest() == last
    # Flat memory: the agent's peak RSS grows by a few chunks' worth, not by the file's size.
    assert _peak_rss(bound_agent) - peak_before < 64 * MiB
    target.unlink()  # pytest keeps the last runs' tmp dirs: do not leave a GiB behind.


def test_file_errors_name_their_cause_and_path(bound_agent: RunningAgent, tmp_path: Path) -> None:
    """Every errno a person can cause maps to the status of its meaning, with the path in the message.

    Root passes permission checks, so the refusals come from the kernel's other rules: a read-only
    mount (EROFS, also reached through a symlink), an immutable directory (EPERM), a full tmpfs
    (ENOSPC); the rest from the shape of the tree.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root: a read-only and a small tmpfs mount, chattr +i")
    stub, iid, md = _stub(bound_agent), bound_agent.instance_id, bound_agent.metadata
    readonly, small, locked = tmp_path / "ro", tmp_path / "small", tmp_path / "locked"
    for directory in (readonly, small, locked):
        directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(readonly)], check=True)
    (readonly / "present").write_bytes(b"kept")
    (readonly / "sub").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(readonly)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    (locked / "f").write_bytes(b"x")
    subprocess.run(["chattr", "+i", str(locked)], check=True)
    link = tmp_path / "into-ro"
    link.symlink_to(readonly / "present")
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"x")
    long_name = str(tmp_path / ("n" * 300))
    FP, PD, RE = (
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    IA, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND

    def up(path: Path | str, data: bytes = b"new") -> None:
        upload(bound_agent, fs.UploadFileHeader(path=str(path), overwrite=True, create_parents=True), data)

    def call(method: str, request: object) -> None:
        getattr(stub, method)(request, metadata=md, timeout=30)

    cases: list[tuple[str, object, grpc.StatusCode, str]] = [
        ("upload", lambda: up(readonly / "x"), FP, f"{readonly / 'x'}: read-only file system"),
        ("upload over a file", lambda: up(readonly / "present"), FP, f"{readonly / 'present'}: read-only file system"),
        ("upload through a symlink", lambda: up(link), FP, "read-only file system"),
        ("upload with parents", lambda: up(readonly / "a" / "b"), FP, "read-only file system"),
        ("upload, immutable", lambda: up(locked / "new"), PD, f"{locked / 'new'}: operation not permitted"),
        ("upload, full disk", lambda: up(small / "big", os.urandom(3 * MiB)), RE, "no space left on device"),
        ("upload, not a dir", lambda: up(a_file / "f"), FP, "not a directory"),
        ("upload, long name", lambda: up(long_name), IA, "name too long"),
        (
            "mkdir",
            lambda: call("MakeDirectory", fs.MakeDirectoryRequest(instance_id=iid, path=str(readonly / "d"))),
            FP,
            f"{readonly / 'd'}: read-only file system",
        ),
        (
            "remove",
            lambda: call("RemovePath", fs.RemovePathRequest(instance_id=iid, path=str(readonly / "present"))),
            FP,
            f"{readonly / 'present'}: read-only file system",
        ),
        (
            "remove, immutable",
            lambda: call("RemovePath", fs.RemovePathRequest(instance_id=iid, path=str(locked / "f"))),
            PD,
            str(locked / "f"),
        ),
        (
            "move",
            lambda: call(
                "MovePath",
                fs.MovePathRequest(instance_id=iid, source=str(readonly / "present"), destination=str(readonly / "m")),
            ),
            FP,
            "read-only file system",
        ),
        (
            "stat, not a dir",
            lambda: call("StatPath", fs.StatPathRequest(instance_id=iid, path=str(a_file / "x"))),
            FP,
            f"{a_file / 'x'}: not a directory",
        ),
        (
            "stat, long name",
            lambda: call("StatPath", fs.StatPathRequest(instance_id=iid, path=long_name)),
            IA,
            "name too long",
        ),
        (
            "list, missing",
            lambda: call("ListDirectory", fs.ListDirectoryRequest(instance_id=iid, path=str(readonly / "none"))),
            NF,
            str(readonly / "none"),
        ),
        (
            "download, a directory",
            lambda: download(bound_agent, str(readonly / "sub")),
            FP,
            f"{readonly / 'sub'} is a directory",
        ),
        ("download, not a dir", lambda: download(bound_agent, str(a_file / "x")), FP, "not a directory"),
    ]
    try:
        for what, action, code, text in cases:
            with pytest.raises(grpc.RpcError) as err:
                action()  # type: ignore[operator]
            assert (_code(err), text in _details(err)) == (code, True), (what, _code(err), _details(err))
        assert (readonly / "present").read_bytes() == b"kept" and list(small.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
        subprocess.run(["umount", str(small)], check=True)
        subprocess.run(["umount", str(readonly)], check=True)
