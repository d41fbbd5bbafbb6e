"""A call cut off because its instance went away says so (gRPC and REST): "instance i-... was deleted".

Through the real gateway, with real instance_svc and sandboxes: an exec stream runs in an
instance, the instance is deleted from another client, and the stream's end names
what happened. The gateway decides from the instance's state (lifecycle events, else a fresh
ResolveInstance), never from a guess at the transport's wording.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from cyberdesk import Cyberdesk, FailedPrecondition
from cyberdesk._models import Stdout
from tests.faults.stack import Stack

TENANT = "t-lost"

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[Cyberdesk]:
    with Cyberdesk(api_key=stack.gateway.new_key(TENANT)[1], endpoint=stack.gateway.addr) as c:
        yield c


def _stream_until_it_fails(client: Cyberdesk, instance_id: str, act: object) -> BaseException:
    """Run a long exec stream; once its first output is in, call `act`; return how the stream ended."""
    box = client.instances.handle(instance_id)
    started = threading.Event()
    ended: list[BaseException] = []

    def run() -> None:
        try:
            for event in box.exec_stream("echo up; sleep 100"):
                if isinstance(event, Stdout):
                    started.set()
            ended.append(AssertionError("the stream ended normally, without an error"))
        except BaseException as err:
            ended.append(err)
        finally:
            started.set()

    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    assert started.wait(60), "the exec stream never printed"
    act()  # type: ignore[operator]
    reader.join(60)
    assert ended, "the stream did not end within 60 s"
    return ended[0]


def test_an_exec_stream_whose_instance_is_deleted_ends_saying_it_was_deleted(client: Cyberdesk) -> None:
    box = client.instances.create(timeout=120)
    err = _stream_until_it_fails(client, box.id, box.delete)
    assert isinstance(err, FailedPrecondition), repr(err)
    assert err.message == f"instance {box.id} was deleted", err.message


def test_a_rest_exec_stream_whose_instance_is_deleted_ends_saying_it_was_deleted(
    stack: Stack, client: Cyberdesk
) -> None:
    import json

    import httpx

    key = stack.gateway.new_key(TENANT)[1]
    box = client.instances.create(timeout=120)
    url = f"http://{stack.gateway.http}/v1/instances/{box.id}/processes"
    items: list[dict[str, object]] = []
    with httpx.stream("POST", url, json={"command": "echo up; sleep 100"}, headers={"x-api-key": key}, timeout=60) as r:
        assert r.status_code == 200
        deleted = False
        for line in r.iter_lines():
            if not line.strip():
                continue
            items.append(json.loads(line))
            if not deleted and "stdout" in line:
                box.delete()
                deleted = True
    assert deleted, items
    error = items[-1].get("error")
    assert isinstance(error, dict), items[-1]
    assert error["code"] == 9 and error["message"] == f"instance {box.id} was deleted", error  # FAILED_PRECONDITION
