"""The SDK against a real stack: processes, files, shells, lifecycle, errors (sync and async)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cyberdesk import (
    AsyncCyberdesk,
    Cyberdesk,
    Exited,
    FailedPrecondition,
    Instance,
    InvalidArgument,
    NotFound,
    Started,
    Stderr,
    Stdout,
    Unauthenticated,
)
from tests.cli.stack import RunningStack


@pytest.fixture(scope="module")
def client(stack: RunningStack) -> Iterator[Cyberdesk]:
    key = stack.env_config()["api_key"]
    with Cyberdesk(api_key=key, endpoint=stack.gateway) as made:
        yield made


@pytest.fixture(scope="module")
def box(client: Cyberdesk) -> Iterator[Instance]:
    with client.instances.create(timeout=600, labels={"suite": "sdk"}) as made:
        yield made


def test_config_file_is_found(sdk_env: RunningStack) -> None:
    with Cyberdesk() as client:
        assert client.endpoint == sdk_env.gateway
        client.instances.list()


def test_exec_stream_order_and_result(box: Instance) -> None:
    events = list(box.exec_stream("echo a; echo b >&2; exit 4"))
    assert isinstance(events[0], Started) and events[0].pid > 0
    assert isinstance(events[-1], Exited) and events[-1].exit_code == 4
    assert b"".join(e.data for e in events if isinstance(e, Stdout)) == b"a\n"
    assert b"".join(e.data for e in events if isinstance(e, Stderr)) == b"b\n"
    seen: list[bytes] = []
    result = box.exec(["cat"], stdin=b"piped", on_stdout=seen.append, env={"X": "1"})
    assert (result.exit_code, result.stdout, b"".join(seen)) == (0, b"piped", b"piped")
    assert box.exec("echo $X", env={"X": "from-env"}, cwd="/tmp").stdout_text == "from-env\n"
    timed = box.exec("sleep 20", timeout=0.5)
    assert timed.timed_out and not timed.ok


def test_background_and_reattach(box: Instance) -> None:
    job = box.start("read line; echo got:$line; sleep 0.2; echo end", tag="bg-sdk", keep_stdin_open=True)
    assert job.pid > 0
    again = box.connect(pid=job.pid)
    again.send_stdin("hello\n")
    result = box.connect(tag="bg-sdk").wait()
    assert result.exit_code == 0 and result.stdout_text == "got:hello\nend\n"
    assert any(p.pid == job.pid for p in box.processes())
    killed = box.start("sleep 60")
    killed.kill()
    assert killed.wait().signal == 9


def test_files(box: Instance, tmp_path: Path) -> None:
    files = box.files
    files.make_dir("/tmp/sdk/a/b")
    files.write("/tmp/sdk/a/b/x.txt", "text")
    assert files.read_text("/tmp/sdk/a/b/x.txt") == "text"
    info = files.stat("/tmp/sdk/a/b/x.txt")
    assert (info.type, info.size, info.name) == ("file", 4, "x.txt")
    files.move("/tmp/sdk/a/b/x.txt", "/tmp/sdk/y.txt")
    assert [e.name for e in files.list("/tmp/sdk")] == ["a", "y.txt"]
    assert not files.exists("/tmp/sdk/a/b/x.txt")
    data = os.urandom(3 * 1024 * 1024 + 7)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    progress: list[tuple[int, int | None]] = []
    up = files.upload(src, "/tmp/sdk/in.bin", progress=lambda d, t: progress.append((d, t)))
    assert up.sha256 == hashlib.sha256(data).hexdigest() and up.size == len(data)
    assert progress[-1] == (len(data), len(data))
    got: list[int] = []
    assert files.download("/tmp/sdk/in.bin", tmp_path / "out.bin", progress=lambda d, t: got.append(d)) == len(data)
    assert (tmp_path / "out.bin").read_bytes() == data and got[-1] == len(data)
    with pytest.raises(InvalidArgument):
        files.write("relative/path", "x")
    files.remove("/tmp/sdk", recursive=True)
    with pytest.raises(NotFound):
        files.stat("/tmp/sdk")


def test_watch(box: Instance) -> None:
    box.files.make_dir("/tmp/watched")
    with box.files.watch("/tmp/watched") as watch:
        box.files.write("/tmp/watched/new.txt", "x")
        for event in watch:
            if event.path == "/tmp/watched/new.txt":
                break
    assert event.type in ("create", "modify", "rename")


def test_shell(box: Instance) -> None:
    with box.shell(cols=90, rows=20) as term:
        seen = b""
        while b"$ " not in seen:
            seen += term.recv(timeout=30)
        term.send("stty size; exit 7\n")
        output = b"".join(term)
    assert b"20 90" in output
    assert term.exit_code == 7


def test_lifecycle(client: Cyberdesk) -> None:
    inst = client.instances.create(timeout=120)
    try:
        before = inst.data.expire_time
        inst.set_timeout(900)
        assert inst.data.expire_time is not None and before is not None and inst.data.expire_time > before
        assert client.instances.get(inst.id).state == "RUNNING"
        try:
            inst.pause()
        except FailedPrecondition:
            pass  # a runtime that cannot pause says so precisely
        else:
            assert inst.state == "PAUSED"
            assert inst.resume().state == "RUNNING"
        assert inst.exec("echo alive").stdout_text == "alive\n"
    finally:
        inst.delete()
    assert inst.state == "TERMINATED"
    assert inst.id not in [i.id for i in client.instances.list(states=["RUNNING"])]
    with pytest.raises(InvalidArgument):
        client.instances.list(states=["SLEEPY"])


def test_context_manager_deletes(client: Cyberdesk) -> None:
    with client.instances.create() as inst:
        inst_id = inst.id
    assert client.instances.get(inst_id).state == "TERMINATED"


def test_errors(client: Cyberdesk, stack: RunningStack) -> None:
    with pytest.raises(NotFound):
        client.instances.get("i-000000000000")
    with Cyberdesk(api_key="cd_wrong", endpoint=stack.gateway) as bad, pytest.raises(Unauthenticated):
        bad.instances.list()


def test_async_client(stack: RunningStack) -> None:
    key = stack.env_config()["api_key"]

    async def scenario() -> tuple[str, bytes, int, bytes]:
        async with AsyncCyberdesk(api_key=key, endpoint=stack.gateway) as client:
            box = await client.instances.create()
            async with box:
                out = (await box.exec("echo async")).stdout_text
                await box.files.write("/tmp/a.txt", b"async-bytes")
                data = await box.files.read("/tmp/a.txt")
                job = await box.start("exit 9", tag="aj")
                code = (await box.connect(pid=job.pid).wait()).exit_code
                shell = await box.shell()
                async with shell:
                    seen = b""
                    while b"$ " not in seen:
                        seen += await shell.recv()
                    await shell.send("echo via-$((2+3)); exit\n")
                    rest = b"".join([chunk async for chunk in shell])
            return out, data, code, rest

    out, data, code, rest = asyncio.run(scenario())
    assert (out, data, code) == ("async\n", b"async-bytes", 9)
    assert b"via-5" in rest
