"""The transfer engine called in-process: uploads and downloads on a temporary directory, no gRPC.

Requests are built as the servicer receives them and fed to `TransferEngine` from plain async
iterators, so a broken stream or a second upload of the same id can be staged exactly. The
real-agent tests (tests/guest_agent/integration/test_files.py) cover the same paths end to end.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from cyberdesk_common.status import RpcError
from cyberdesk_proto.v1 import filesystem_pb2 as fs
from guest_agent.transfer import DOWNLOAD_CHUNK, TransferEngine, check_sha256, check_upload_id, temp_name

_T = TypeVar("_T")


def _run(scenario: Callable[[], Awaitable[_T]]) -> _T:
    async def bounded() -> _T:
        return await asyncio.wait_for(scenario(), 20)

    return asyncio.run(bounded())


def _trailer(data: bytes) -> fs.UploadFileRequest:
    return fs.UploadFileRequest(trailer=fs.UploadFileTrailer(size=len(data), sha256=hashlib.sha256(data).hexdigest()))


async def _chunks(
    parts: Iterable[bytes], fail_after: int | None = None, prefix: bytes = b""
) -> AsyncIterator[fs.UploadFileRequest]:
    """The chunks, then the trailer of the whole file (`prefix`: the bytes a resumed upload stored before)."""
    sent = []
    for n, part in enumerate(parts):
        if fail_after is not None and n == fail_after:
            raise ConnectionResetError("the client went away")
        sent.append(part)
        yield fs.UploadFileRequest(chunk=part)
    yield _trailer(prefix + b"".join(sent))


def _upload(
    engine: TransferEngine, header: fs.UploadFileHeader, parts: Iterable[bytes], prefix: bytes = b""
) -> fs.UploadFileResponse:
    return _run(lambda: engine.upload(header, _chunks(parts, prefix=prefix)))


def _download(engine: TransferEngine, path: str, offset: int = 0, length: int = 0) -> list[fs.DownloadFileResponse]:
    async def scenario() -> list[fs.DownloadFileResponse]:
        request = fs.DownloadFileRequest(path=path, offset=offset, length=length)
        return [message async for message in engine.download(request)]

    return _run(scenario)


def _leftovers(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if ".cyberdesk-upload-" in name]


def test_upload_writes_the_chunks_atomically_and_reports_their_sha256(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    parts = [b"a" * 1000, b"", b"b" * 5000, b"c"]
    reply = _upload(TransferEngine(), fs.UploadFileHeader(path=str(target)), parts)
    data = b"".join(parts)
    assert (reply.path, reply.size, reply.sha256) == (str(target), len(data), hashlib.sha256(data).hexdigest())
    assert target.read_bytes() == data
    assert target.stat().st_mode & 0o7777 == 0o644
    assert _leftovers(tmp_path) == []


def test_a_wrong_expected_sha256_is_data_loss_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    header = fs.UploadFileHeader(path=str(target), expected_sha256="0" * 64, upload_id="named-upload-1")
    with pytest.raises(RpcError) as err:
        _upload(TransferEngine(), header, [b"data"])
    assert err.value.code == grpc.StatusCode.DATA_LOSS
    assert not target.exists()
    assert _leftovers(tmp_path) == []  # even a named upload: its bytes are known to be wrong


def test_an_interrupted_named_upload_resumes_with_the_whole_file_sha256(tmp_path: Path) -> None:
    target = tmp_path / "big.bin"
    engine = TransferEngine()
    header = fs.UploadFileHeader(path=str(target), upload_id="resume-me-42")
    with pytest.raises(ConnectionResetError):
        _run(lambda: engine.upload(header, _chunks([b"first ", b"second "], fail_after=1)))
    assert not target.exists()
    (partial,) = _leftovers(tmp_path)
    assert (tmp_path / partial).read_bytes() == b"first "

    too_far = fs.UploadFileHeader(path=str(target), upload_id="resume-me-42", offset=100)
    with pytest.raises(RpcError) as err:
        _upload(engine, too_far, [b"x"])
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "resume from offset 6" in err.value.message

    resumed = fs.UploadFileHeader(path=str(target), upload_id="resume-me-42", offset=6)
    reply = _upload(engine, resumed, [b"second"], prefix=b"first ")
    assert target.read_bytes() == b"first second"
    assert reply.sha256 == hashlib.sha256(b"first second").hexdigest()
    assert reply.size == 12
    assert _leftovers(tmp_path) == []


def test_an_interrupted_anonymous_upload_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "gone.bin"
    with pytest.raises(ConnectionResetError):
        _run(lambda: TransferEngine().upload(fs.UploadFileHeader(path=str(target)), _chunks([b"a", b"b"], 1)))
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_resuming_what_was_never_stored_is_failed_precondition(tmp_path: Path) -> None:
    header = fs.UploadFileHeader(path=str(tmp_path / "f"), upload_id="never-started", offset=3)
    with pytest.raises(RpcError) as err:
        _upload(TransferEngine(), header, [b"x"])
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "start again from offset 0" in err.value.message


def test_a_second_upload_of_the_same_id_while_the_first_runs_is_aborted(tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = TransferEngine()
        header = fs.UploadFileHeader(path=str(tmp_path / "f"), upload_id="one-at-a-time")
        go_on = asyncio.Event()

        async def held() -> AsyncIterator[fs.UploadFileRequest]:
            yield fs.UploadFileRequest(chunk=b"part")
            await go_on.wait()
            yield _trailer(b"part")

        first = asyncio.create_task(engine.upload(header, held()))
        await asyncio.sleep(0.05)
        with pytest.raises(RpcError) as err:
            await engine.upload(header, _chunks([b"other"]))
        assert err.value.code == grpc.StatusCode.ABORTED
        go_on.set()
        assert (await first).size == 4

    _run(scenario)


def test_overwrite_and_symlinks(tmp_path: Path) -> None:
    engine = TransferEngine()
    real = tmp_path / "real.txt"
    real.write_bytes(b"old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    with pytest.raises(RpcError) as err:
        _upload(engine, fs.UploadFileHeader(path=str(real)), [b"new"])
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    reply = _upload(engine, fs.UploadFileHeader(path=str(link), overwrite=True, mode=0o600), [b"new"])
    assert reply.path == os.path.realpath(real)  # the file the link points to is replaced, the link kept
    assert link.is_symlink()
    assert real.read_bytes() == b"new"
    assert real.stat().st_mode & 0o7777 == 0o600


def test_parents_are_created_only_when_asked(tmp_path: Path) -> None:
    engine = TransferEngine()
    deep = tmp_path / "a" / "b" / "f"
    with pytest.raises(RpcError) as err:
        _upload(engine, fs.UploadFileHeader(path=str(deep)), [b"x"])
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    _upload(engine, fs.UploadFileHeader(path=str(deep), create_parents=True), [b"x"])
    assert deep.read_bytes() == b"x"
    with pytest.raises(RpcError) as err:
        _upload(engine, fs.UploadFileHeader(path=str(tmp_path / "a"), overwrite=True), [b"x"])
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION  # a directory is never replaced


@pytest.mark.parametrize(
    ("header", "text"),
    [
        (fs.UploadFileHeader(path="relative"), "absolute"),
        (fs.UploadFileHeader(path="/tmp/f", offset=4), "only a named upload can be resumed"),
        (fs.UploadFileHeader(path="/tmp/f", offset=-1, upload_id="abcdefgh"), "offset must be >= 0"),
        (fs.UploadFileHeader(path="/tmp/f", mode=0o10000), "permission bits"),
        (fs.UploadFileHeader(path="/tmp/f", upload_id="short"), "upload_id"),
        (fs.UploadFileHeader(path="/tmp/f", expected_sha256="abc"), "64 hexadecimal digits"),
    ],
)
def test_bad_headers_are_invalid_argument(header: fs.UploadFileHeader, text: str) -> None:
    with pytest.raises(RpcError) as err:
        _upload(TransferEngine(), header, [b"x"])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert text in err.value.message


def test_header_values_are_normalised() -> None:
    assert check_sha256("AB" * 32, "f") == "ab" * 32
    assert check_sha256("", "f") == ""
    check_upload_id("")
    check_upload_id("A_b-" * 16)
    with pytest.raises(RpcError):
        check_upload_id("x" * 65)
    name = os.path.basename(temp_name("/d/" + "é" * 200, "tok"))
    assert len(name.encode()) <= 255
    assert name.startswith(".") and name.endswith(".cyberdesk-upload-tok")


def test_download_sends_chunks_and_the_sha256_of_the_range(tmp_path: Path) -> None:
    data = os.urandom(DOWNLOAD_CHUNK * 2 + 10)
    path = tmp_path / "f"
    path.write_bytes(data)
    engine = TransferEngine()
    whole = _download(engine, str(path))
    assert [len(m.chunk) for m in whole] == [DOWNLOAD_CHUNK, DOWNLOAD_CHUNK, 10]
    assert [m.total_size for m in whole] == [len(data), 0, 0]  # the size comes once, first
    assert [bool(m.sha256) for m in whole] == [False, False, True]  # the digest comes once, last
    assert b"".join(m.chunk for m in whole) == data
    assert whole[-1].sha256 == hashlib.sha256(data).hexdigest()

    part = _download(engine, str(path), offset=DOWNLOAD_CHUNK - 5, length=20)
    assert b"".join(m.chunk for m in part) == data[DOWNLOAD_CHUNK - 5 : DOWNLOAD_CHUNK + 15]
    assert part[-1].sha256 == hashlib.sha256(data[DOWNLOAD_CHUNK - 5 : DOWNLOAD_CHUNK + 15]).hexdigest()
    assert part[0].total_size == len(data)

    at_end = _download(engine, str(path), offset=len(data))
    assert [(m.chunk, m.total_size, m.sha256) for m in at_end] == [(b"", len(data), hashlib.sha256().hexdigest())]


def test_download_errors(tmp_path: Path) -> None:
    engine = TransferEngine()
    (tmp_path / "f").write_bytes(b"abc")
    cases = [
        (str(tmp_path / "f"), 4, 0, grpc.StatusCode.OUT_OF_RANGE),
        (str(tmp_path / "f"), -1, 0, grpc.StatusCode.INVALID_ARGUMENT),
        (str(tmp_path / "f"), 0, -1, grpc.StatusCode.INVALID_ARGUMENT),
        (str(tmp_path), 0, 0, grpc.StatusCode.FAILED_PRECONDITION),
        ("/dev/null", 0, 0, grpc.StatusCode.FAILED_PRECONDITION),
        (str(tmp_path / "missing"), 0, 0, grpc.StatusCode.NOT_FOUND),
    ]
    for path, offset, length, code in cases:
        with pytest.raises(RpcError) as err:
            _download(engine, path, offset, length)
        assert err.value.code == code, (path, offset, length, err.value.message)


def test_a_download_closed_early_releases_its_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * (DOWNLOAD_CHUNK * 3))

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def scenario() -> None:
        before = open_fds()
        stream = TransferEngine().download(fs.DownloadFileRequest(path=str(path)))
        first = await anext(stream)
        assert len(first.chunk) == DOWNLOAD_CHUNK
        await stream.aclose()  # what a cancelled call does
        for _ in range(100):  # the read-ahead may still run in its thread: it closes after it
            if open_fds() == before:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the file stayed open after the download was closed")

    _run(scenario)


async def _without_trailer(parts: Iterable[bytes]) -> AsyncIterator[fs.UploadFileRequest]:
    """A request stream that ends cleanly after its chunks: what a dropped caller can look like."""
    for part in parts:
        yield fs.UploadFileRequest(chunk=part)


@pytest.mark.parametrize("upload_id", ["", "kept-partial-1"])
def test_a_stream_that_ends_without_its_trailer_commits_nothing(tmp_path: Path, upload_id: str) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old content!")
    engine = TransferEngine()
    header = fs.UploadFileHeader(path=str(target), overwrite=True, upload_id=upload_id)
    with pytest.raises(RpcError) as err:
        _run(lambda: engine.upload(header, _without_trailer([b"new ", b"half"])))
    assert err.value.code == grpc.StatusCode.ABORTED
    assert "ended before its trailer" in err.value.message and str(target) in err.value.message
    assert target.read_bytes() == b"old content!"
    if upload_id:
        # A named upload keeps what arrived, StatUpload says how much, and it resumes from there.
        assert _leftovers(tmp_path) != []
        assert _run(lambda: engine.stat_upload(str(target), upload_id)) == 8
        resumed = fs.UploadFileHeader(path=str(target), overwrite=True, upload_id=upload_id, offset=8)
        reply = _upload(engine, resumed, [b" done"], prefix=b"new half")
        assert target.read_bytes() == b"new half done" and reply.size == 13
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("trailer", "text"),
    [
        (fs.UploadFileTrailer(size=4, sha256=hashlib.sha256(b"data").hexdigest()), "says 4 bytes but 8 arrived"),
        (fs.UploadFileTrailer(size=8, sha256="0" * 64), "not the trailer's " + "0" * 64),
    ],
)
def test_a_trailer_that_does_not_match_is_data_loss_and_keeps_the_old_content(
    tmp_path: Path, trailer: fs.UploadFileTrailer, text: str
) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    async def requests() -> AsyncIterator[fs.UploadFileRequest]:
        yield fs.UploadFileRequest(chunk=b"datadata")
        yield fs.UploadFileRequest(trailer=trailer)

    header = fs.UploadFileHeader(path=str(target), overwrite=True, upload_id="mismatch-1")
    with pytest.raises(RpcError) as err:
        _run(lambda: TransferEngine().upload(header, requests()))
    assert err.value.code == grpc.StatusCode.DATA_LOSS and text in err.value.message, err.value.message
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []  # even named: bytes that do not add up are no base to resume from


def test_stat_upload_errors(tmp_path: Path) -> None:
    engine = TransferEngine()
    with pytest.raises(RpcError) as err:
        _run(lambda: engine.stat_upload(str(tmp_path / "f"), "never-started"))
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "never-started" in err.value.message
    for path, upload_id in (("relative", "abcdefgh"), (str(tmp_path / "f"), ""), (str(tmp_path / "f"), "bad id")):
        with pytest.raises(RpcError) as err:
            _run(lambda path=path, upload_id=upload_id: engine.stat_upload(path, upload_id))  # type: ignore[misc]
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_stat_upload_of_an_upload_in_progress_is_aborted(tmp_path: Path) -> None:
    async def scenario() -> None:
        engine = TransferEngine()
        header = fs.UploadFileHeader(path=str(tmp_path / "f"), upload_id="still-running")
        go_on, reading = asyncio.Event(), asyncio.Event()

        async def held() -> AsyncIterator[fs.UploadFileRequest]:
            reading.set()  # the engine has prepared the upload and asks for its chunks
            yield fs.UploadFileRequest(chunk=b"part")
            await go_on.wait()
            yield _trailer(b"part")

        running = asyncio.create_task(engine.upload(header, held()))
        await reading.wait()
        with pytest.raises(RpcError) as err:
            await engine.stat_upload(str(tmp_path / "f"), "still-running")
        assert err.value.code == grpc.StatusCode.ABORTED
        go_on.set()
        assert (await running).size == 4

    _run(scenario)


def test_a_download_from_an_offset_can_carry_the_whole_files_sha256(tmp_path: Path) -> None:
    data = os.urandom(DOWNLOAD_CHUNK * 2 + 10)
    path = tmp_path / "f"
    path.write_bytes(data)
    engine = TransferEngine()

    async def scenario(offset: int, length: int = 0) -> list[fs.DownloadFileResponse]:
        request = fs.DownloadFileRequest(path=str(path), offset=offset, length=length, file_sha256=True)
        return [message async for message in engine.download(request)]

    whole = hashlib.sha256(data).hexdigest()
    for offset in (0, 7, DOWNLOAD_CHUNK, len(data)):
        messages = _run(lambda offset=offset: scenario(offset))  # type: ignore[misc]
        assert b"".join(m.chunk for m in messages) == data[offset:]
        assert messages[-1].sha256 == hashlib.sha256(data[offset:]).hexdigest()  # still of the bytes sent
        assert messages[-1].file_sha256 == whole, offset
        assert [m.file_sha256 for m in messages[:-1]] == [""] * (len(messages) - 1)
    # A range that stops short of the end has no whole-file hash to give.
    assert _run(lambda: scenario(3, 10))[-1].file_sha256 == ""
    # Not asked: not sent (the prefix is not read for nothing).
    assert _download(engine, str(path), offset=7)[-1].file_sha256 == ""


def test_an_abandoned_partial_file_is_removed_after_its_keep_time_and_a_resume_keeps_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        target = tmp_path / "f"
        short = TransferEngine(partial_keep=0)
        header = fs.UploadFileHeader(path=str(target), upload_id="abandoned-1")
        with pytest.raises(ConnectionResetError):
            await short.upload(header, _chunks([b"kept ", b"more"], fail_after=1))
        # Removed by a timer, then an unlink in a thread: polled, not timed.
        for _ in range(500):
            if not _leftovers(tmp_path):
                break
            await asyncio.sleep(0.01)
        assert _leftovers(tmp_path) == []

        # A long keep time: the partial file waits, and a resume uses it (its timer is cancelled).
        patient = TransferEngine(partial_keep=3600)
        header = fs.UploadFileHeader(path=str(target), upload_id="resumed-1")
        with pytest.raises(ConnectionResetError):
            await patient.upload(header, _chunks([b"kept ", b"more"], fail_after=1))
        assert await patient.stat_upload(str(target), "resumed-1") == 5
        resumed = fs.UploadFileHeader(path=str(target), upload_id="resumed-1", offset=5)
        reply = await patient.upload(resumed, _chunks([b"more"], prefix=b"kept "))
        assert reply.size == 9 and target.read_bytes() == b"kept more"
        assert patient._expiry == {}

    _run(scenario)
