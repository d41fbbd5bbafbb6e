"""An instance's disk size, egress policy and memory limit through the SDK, against a real stack.

Written for the async client; tools/unasync.py generates the sync twin (tests/sdk/_sync/test_limits.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from cyberdesk import AsyncCyberdesk, AsyncInstance, EgressPolicy, Exited, InvalidArgument
from tests.cli.stack import RunningStack

# Asks for 2 GiB at once: far beyond a 256 MiB instance, so the kernel's OOM killer ends it.
MEMORY_BOMB = ["python3", "-c", "b = bytearray(2**31)"]


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
async def small(client: AsyncCyberdesk) -> AsyncIterator[AsyncInstance]:
    """An instance with 256 MiB of memory."""
    made = await client.instances.create(timeout=600, memory_mib=256, labels={"suite": "sdk-limits"})
    async with made:
        yield made


@pytest.mark.anyio
async def test_disk_size(client: AsyncCyberdesk) -> None:
    inst = await client.instances.create(disk_mib=512)
    async with inst:
        assert inst.data.disk_mib == 512
        assert (await client.instances.get(inst.id)).data.disk_mib == 512
        assert inst.data.to_dict()["disk_mib"] == 512
        # df inside sees the instance's own file system of that size (ext4 keeps a few MiB for itself).
        df = await inst.exec("df -B1M --output=size /home /tmp | tail -n +2")
        sizes = [int(line) for line in df.stdout_text.split()]
        assert len(sizes) == 2 and all(480 <= size <= 512 for size in sizes), df.stdout_text


@pytest.mark.anyio
async def test_default_disk_and_no_network(client: AsyncCyberdesk) -> None:
    inst = await client.instances.create()
    async with inst:
        assert inst.data.disk_mib == 2048  # the base template's
        assert not inst.data.internet
        assert inst.data.egress == EgressPolicy([], [])


@pytest.mark.anyio
async def test_egress_policy_is_reported(client: AsyncCyberdesk) -> None:
    inst = await client.instances.create(internet=True, allow=["198.51.100.7"], deny=["203.0.113.0/24"])
    async with inst:
        assert inst.data.internet
        assert inst.data.egress == EgressPolicy(["198.51.100.7"], ["203.0.113.0/24"])
        got = await client.instances.get(inst.id)
        assert (got.data.egress.allow, got.data.egress.deny) == (["198.51.100.7"], ["203.0.113.0/24"])
        assert got.data.to_dict()["egress"] == {"allow": ["198.51.100.7"], "deny": ["203.0.113.0/24"]}
        assert (await inst.exec("echo up")).stdout_text == "up\n"  # a working instance, no traffic sent


@pytest.mark.anyio
async def test_bad_egress_entry_is_invalid_argument_naming_it(client: AsyncCyberdesk) -> None:
    with pytest.raises(InvalidArgument, match="'not a host'") as bad:
        await client.instances.create(internet=True, allow=["not a host"])
    assert "egress.allow" in bad.value.message
    with pytest.raises(InvalidArgument, match=r"egress\.deny: .10\.0\.0\.1/8"):
        await client.instances.create(internet=True, deny=["10.0.0.1/8"])  # host bits set


@pytest.mark.anyio
async def test_allow_without_internet_is_refused_locally() -> None:
    # No server listens there: the refusal has to come before any call.
    async with AsyncCyberdesk(api_key="cd_unused", endpoint="127.0.0.1:1") as offline:
        with pytest.raises(InvalidArgument, match=r"allow needs internet=True"):
            await offline.instances.create(allow=["198.51.100.7"])
        with pytest.raises(InvalidArgument, match=r"deny needs internet=True"):
            await offline.instances.create(deny=["203.0.113.0/24"])


@pytest.mark.anyio
async def test_out_of_memory_on_exec(small: AsyncInstance) -> None:
    result = await small.exec(MEMORY_BOMB)
    assert result.out_of_memory and not result.ok
    assert result.signal == 9 and "out of memory" in result.error and "256 MiB" in result.error
    # The streaming path behind exec() with a callback reports it too.
    streamed = await small.exec(MEMORY_BOMB, on_stderr=lambda data: None)
    assert streamed.out_of_memory and streamed.signal == 9
    # A process the command started was the victim: the shell lives on, and says so.
    child = await small.exec(f"{' '.join(MEMORY_BOMB[:2])} '{MEMORY_BOMB[2]}'; echo after-$?")
    assert child.out_of_memory and child.stdout_text == "after-137\n"
    # The instance survives, and an ordinary command is not out of memory.
    fine = await small.exec("echo fine")
    assert fine.stdout_text == "fine\n" and not fine.out_of_memory


@pytest.mark.anyio
async def test_out_of_memory_on_exec_stream(small: AsyncInstance) -> None:
    events = [event async for event in small.exec_stream(MEMORY_BOMB)]
    exited = events[-1]
    assert isinstance(exited, Exited)
    assert exited.out_of_memory and exited.signal == 9 and "out of memory" in exited.error
    normal = [event async for event in small.exec_stream("true")][-1]
    assert isinstance(normal, Exited) and normal.exit_code == 0 and not normal.out_of_memory
