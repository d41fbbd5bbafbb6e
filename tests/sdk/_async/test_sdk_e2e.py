"""The SDK against a real stack: processes, files, shells, lifecycle, errors.

Written for the async client; tools/unasync.py generates the same tests for the sync client
(tests/sdk/_sync/test_sdk_e2e.py), so both sides pass one suite.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cyberdesk import (
    AsyncCyberdesk,
    AsyncInstance,
    Exited,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Started,
    Stderr,
    Stdout,
    Unauthenticated,
)
from cyberdesk._requests import MAX_RUN_OUTPUT
from tests.cli.stack import RunningStack


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Module-scoped, so the module's client and instance live in one event loop."""
    return "asyncio"


@pytest.fixture(scope="module")
async def client(stack: RunningStack) -> AsyncIterator[AsyncCyberdesk]:
    key = stack.env_config()["api_key"]
    async with AsyncCyberdesk(api_key=key, endpoint=stack.gateway) as made:
        yield made


@pytest.fixture(scope="module")
async def box(client: AsyncCyberdesk) -> AsyncIterator[AsyncInstance]:
    made = await client.instances.create(timeout=600, labels={"suite": "sdk"})
    async with made:
        yield made


@pytest.mark.anyio
async def test_config_file_is_found(sdk_env: RunningStack) -> None:
    async with AsyncCyberdesk() as client:
        assert client.endpoint == sdk_env.gateway
        await client.instances.list()


@pytest.mark.anyio
async def test_exec_stream_order_and_result(box: AsyncInstance) -> None:
    events = [event async for event in box.exec_stream("echo a; echo b >&2; exit 4")]
    assert isinstance(events[0], Started) and events[0].pid > 0
    assert isinstance(events[-1], Exited) and events[-1].exit_code == 4
    assert b"".join(e.data for e in events if isinstance(e, Stdout)) == b"a\n"
    assert b"".join(e.data for e in events if isinstance(e, Stderr)) == b"b\n"
    seen: list[bytes] = []
    result = await box.exec(["cat"], stdin=b"piped", on_stdout=seen.append, env={"X": "1"})
    assert (result.exit_code, result.stdout, b"".join(seen)) == (0, b"piped", b"piped")
    from_env = await box.exec("echo $X", env={"X": "from-env"}, cwd="/tmp")
    assert from_env.stdout_text == "from-env\n"
    timed = await box.exec("sleep 20", timeout=0.5)
    assert timed.timed_out and not timed.ok


@pytest.mark.anyio
async def test_exec_whole_result_in_one_call(box: AsyncInstance) -> None:
    """Without callbacks exec() is one RunProcess call: same result, and its output cap is reported."""
    result = await box.exec("echo out; echo err >&2; exit 3", stdin="unused")
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert result.pid > 0 and not result.truncated
    piped = await box.exec(["tr", "a-z", "A-Z"], stdin="hello")
    assert piped.stdout == b"HELLO"
    missing = await box.exec(["no-such-command-xyz"])
    assert missing.exit_code == 127
    # 16 MiB of output: RunProcess keeps the first 15 MiB and says so; the command still ends normally.
    big = "head -c 16777216 /dev/zero"
    capped = await box.exec(big)
    assert capped.ok and capped.truncated and len(capped.stdout) == MAX_RUN_OUTPUT
    # With a callback the streaming path drops nothing.
    sizes: list[int] = []
    whole = await box.exec(big, on_stdout=lambda data: sizes.append(len(data)))
    assert whole.ok and not whole.truncated and len(whole.stdout) == sum(sizes) == 16 * 1024 * 1024


@pytest.mark.anyio
async def test_exec_has_no_deadline(stack: RunningStack, box: AsyncInstance) -> None:
    """The client's timeout bounds unary calls, never a command: exec() outlives it."""
    key = stack.env_config()["api_key"]
    async with AsyncCyberdesk(api_key=key, endpoint=stack.gateway, timeout=0.5) as impatient:
        slow = await impatient.instances.handle(box.id).exec("sleep 1.5; echo late")
    assert slow.stdout == b"late\n"


@pytest.mark.anyio
async def test_background_and_reattach(box: AsyncInstance) -> None:
    job = await box.start("read line; echo got:$line; sleep 0.2; echo end", tag="bg-sdk", keep_stdin_open=True)
    assert job.pid > 0
    again = box.connect(pid=job.pid)
    await again.send_stdin("hello\n")
    result = await box.connect(tag="bg-sdk").wait()
    assert result.exit_code == 0 and result.stdout_text == "got:hello\nend\n"
    assert any(p.pid == job.pid for p in await box.processes())
    killed = await box.start("sleep 60")
    await killed.kill()
    ended = await killed.wait()
    assert ended.signal == 9


@pytest.mark.anyio
async def test_files(box: AsyncInstance, tmp_path: Path) -> None:
    files = box.files
    await files.make_dir("/tmp/sdk/a/b")
    await files.write("/tmp/sdk/a/b/x.txt", "text")
    assert await files.read_text("/tmp/sdk/a/b/x.txt") == "text"
    info = await files.stat("/tmp/sdk/a/b/x.txt")
    assert (info.type, info.size, info.name) == ("file", 4, "x.txt")
    await files.move("/tmp/sdk/a/b/x.txt", "/tmp/sdk/y.txt")
    assert [e.name for e in await files.list("/tmp/sdk")] == ["a", "y.txt"]
    assert not await files.exists("/tmp/sdk/a/b/x.txt")
    data = os.urandom(3 * 1024 * 1024 + 7)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    progress: list[tuple[int, int | None]] = []
    up = await files.upload(src, "/tmp/sdk/in.bin", progress=lambda d, t: progress.append((d, t)))
    assert up.sha256 == hashlib.sha256(data).hexdigest() and up.size == len(data)
    assert progress[-1] == (len(data), len(data))
    got: list[int] = []
    count = await files.download("/tmp/sdk/in.bin", tmp_path / "out.bin", progress=lambda d, t: got.append(d))
    assert count == len(data)
    assert (tmp_path / "out.bin").read_bytes() == data and got[-1] == len(data)
    assert await files.read("/tmp/sdk/in.bin") == data
    into = io.BytesIO()  # an open binary file as the destination
    assert await files.download("/tmp/sdk/in.bin", into) == len(data)
    assert into.getvalue() == data
    with pytest.raises(InvalidArgument):
        await files.write("relative/path", "x")
    await files.remove("/tmp/sdk", recursive=True)
    with pytest.raises(NotFound):
        await files.stat("/tmp/sdk")
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]


@pytest.mark.anyio
async def test_watch(box: AsyncInstance) -> None:
    await box.files.make_dir("/tmp/watched")
    watch = await box.files.watch("/tmp/watched")
    async with watch:
        await box.files.write("/tmp/watched/new.txt", "x")
        async for event in watch:
            if event.path == "/tmp/watched/new.txt":
                break
    assert event.type in ("create", "modify", "rename")


@pytest.mark.anyio
async def test_shell(box: AsyncInstance) -> None:
    term = await box.shell(cols=90, rows=20)
    async with term:
        seen = b""
        while b"$ " not in seen:
            seen += await term.recv(timeout=30)
        await term.send("stty size; exit 7\n")
        output = b"".join([chunk async for chunk in term])
    assert b"20 90" in output
    assert term.exit_code == 7


@pytest.mark.anyio
async def test_shell_wait_keeps_the_output(box: AsyncInstance) -> None:
    term = await box.shell()
    async with term:
        # Read the prompt away until the terminal is quiet for a moment (a loaded machine may have it
        # waiting already): the read that times out must leave the terminal open.
        with pytest.raises(TimeoutError):
            for _ in range(50):
                await term.recv(timeout=0.5)
        await term.send("echo wa$((1+1))it; exit 3\n")
        exited = await term.wait(timeout=30)
        assert exited is not None and exited.exit_code == 3
        rest = b"".join([chunk async for chunk in term])
    assert b"wa2it" in rest


@pytest.mark.anyio
async def test_lifecycle(client: AsyncCyberdesk) -> None:
    inst = await client.instances.create(timeout=120)
    try:
        before = inst.data.expire_time
        await inst.set_timeout(900)
        assert inst.data.expire_time is not None and before is not None and inst.data.expire_time > before
        got = await client.instances.get(inst.id)
        assert got.state == "RUNNING"
        try:
            await inst.pause()
        except FailedPrecondition:
            pass  # a runtime that cannot pause says so precisely
        else:
            assert inst.state == "PAUSED"
            resumed = await inst.resume()
            assert resumed.state == "RUNNING"
        alive = await inst.exec("echo alive")
        assert alive.stdout_text == "alive\n"
        handle = client.instances.handle(inst.id)  # no call: an id is enough to work with
        assert handle.state == "UNKNOWN"
        assert (await handle.exec("echo by-id")).stdout_text == "by-id\n"
        refreshed = await handle.refresh()
        assert refreshed.state == "RUNNING"
    finally:
        await inst.delete()
    assert inst.state == "TERMINATED"
    assert inst.id not in [i.id for i in await client.instances.list(states=["RUNNING"])]
    with pytest.raises(InvalidArgument):
        await client.instances.list(states=["SLEEPY"])


@pytest.mark.anyio
async def test_context_manager_deletes(client: AsyncCyberdesk) -> None:
    inst = await client.instances.create()
    async with inst:
        inst_id = inst.id
    gone = await client.instances.get(inst_id)
    assert gone.state == "TERMINATED"


@pytest.mark.anyio
async def test_snapshots_and_keys(client: AsyncCyberdesk, box: AsyncInstance) -> None:
    await box.files.write("/home/user/kept.txt", "kept")
    snap = await box.snapshot("sdk")
    assert snap.instance_id == box.id
    assert snap.id in [s.id for s in await client.snapshots.list(box.id)]
    assert (await client.snapshots.get(snap.id)).display_name == "sdk"
    await client.snapshots.delete(snap.id)
    assert snap.id not in [s.id for s in await client.snapshots.list()]
    key, secret = await client.keys.create("dev", "sdk-test")
    assert secret.startswith("cd_") and key.key_id in [k.key_id for k in await client.keys.list("dev")]
    revoked = await client.keys.revoke(key.key_id)
    assert revoked.revoke_time is not None


@pytest.mark.anyio
async def test_errors(client: AsyncCyberdesk, stack: RunningStack) -> None:
    with pytest.raises(NotFound):
        await client.instances.get("i-000000000000")
    async with AsyncCyberdesk(api_key="cd_wrong", endpoint=stack.gateway) as bad:
        with pytest.raises(Unauthenticated):
            await bad.instances.list()


@pytest.mark.anyio
async def test_client_scenario(stack: RunningStack) -> None:
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

    out, data, code, rest = await scenario()
    assert (out, data, code) == ("async\n", b"async-bytes", 9)
    assert b"via-5" in rest
