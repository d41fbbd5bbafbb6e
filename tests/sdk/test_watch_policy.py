"""The reconnect policy shared by the SDK's watch and create (cyberdesk/_watch.py): pure, no server."""

from __future__ import annotations

import datetime as dt

import grpc

import cyberdesk
from cyberdesk._watch import Backoff, InstanceEvent, resumable
from cyberdesk_proto.v1 import instance_pb2


def test_only_unavailable_is_resumed() -> None:
    assert resumable(grpc.StatusCode.UNAVAILABLE)
    for code in (
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        None,
    ):
        assert not resumable(code)


def test_backoff_doubles_to_its_cap_gives_up_after_its_budget_and_resets() -> None:
    backoff = Backoff(first=0.2, cap=1.0, give_up_after=4.0)
    delays = []
    while (delay := backoff.next_delay()) is not None:
        delays.append(delay)
    assert 0.16 <= delays[0] <= 0.24 and all(d <= 1.2 for d in delays)
    assert 3.0 <= sum(delays) <= 4.0  # spent close to the budget, never past it
    backoff.reset()
    first = backoff.next_delay()
    assert first is not None and first <= 0.24


def test_an_event_carries_its_cursor_and_the_previous_state() -> None:
    reply = instance_pb2.WatchInstancesResponse(
        event_id="17-0",
        cursor="17-0",
        instance=instance_pb2.Instance(instance_id="i-1", state=instance_pb2.INSTANCE_STATE_RUNNING),
        previous_state=instance_pb2.INSTANCE_STATE_STARTING,
    )
    reply.event_time.FromDatetime(dt.datetime(2026, 1, 2, tzinfo=dt.UTC))
    event = InstanceEvent.from_proto(reply)
    assert (event.cursor, event.instance.id, event.state, event.previous_state) == (
        "17-0",
        "i-1",
        "RUNNING",
        "STARTING",
    )
    assert event.time == dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    assert cyberdesk.InstanceEvent is InstanceEvent
    assert cyberdesk.InstanceWatch.__name__ == "InstanceWatch"
