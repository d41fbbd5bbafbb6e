"""What both sides of `client.instances.watch()` share: the event record and the reconnect policy.

Pure: no I/O, so the policy (which failures are resumed, how long to wait) is tested without a
server. The loops themselves are in cyberdesk/_async/watch.py (and its generated sync twin).
"""

from __future__ import annotations

import datetime as _dt
import random
from dataclasses import dataclass

import grpc

from cyberdesk._models import InstanceData
from cyberdesk_proto.v1 import instance_pb2

# Response header of WatchInstances: the cursor the watch starts after (instance.proto).
WATCH_CURSOR_HEADER = "cyberdesk-watch-cursor"


@dataclass(frozen=True)
class InstanceEvent:
    """One state change: the instance after it, the state before, when, and where to resume."""

    instance: InstanceData
    previous_state: str  # "" for the PENDING that creates an instance
    time: _dt.datetime
    cursor: str  # pass as `cursor=` to a later watch to resume after this change

    @property
    def state(self) -> str:
        """The state after the change."""
        return self.instance.state

    @classmethod
    def from_proto(cls, reply: instance_pb2.WatchInstancesResponse) -> InstanceEvent:
        """The event of one WatchInstancesResponse."""
        previous = ""
        if reply.previous_state:
            previous = instance_pb2.InstanceState.Name(reply.previous_state).removeprefix("INSTANCE_STATE_")
        return cls(
            instance=InstanceData.from_proto(reply.instance),
            previous_state=previous,
            time=reply.event_time.ToDatetime(tzinfo=_dt.UTC),
            cursor=reply.cursor or reply.event_id,
        )


def resumable(code: grpc.StatusCode | None) -> bool:
    """Whether a watch that ended with `code` is opened again from its last cursor.

    UNAVAILABLE is every transient end: the event store or instance_svc unreachable, the gateway
    restarting, a dropped connection (grpc reports a lost transport as UNAVAILABLE). Anything else
    (UNAUTHENTICATED for a revoked key, OUT_OF_RANGE, NOT_FOUND) would fail the same way again.
    """
    return code is grpc.StatusCode.UNAVAILABLE


@dataclass
class Backoff:
    """Exponential back-off with jitter, bounded in total time since the last success.

    Jitter (+-20 %) keeps a fleet of watchers cut off by the same outage from reconnecting in
    lockstep. `give_up_after` bounds a continuous outage; a success resets everything.
    """

    first: float = 0.2
    cap: float = 5.0
    give_up_after: float = 300.0
    _delay: float = 0.0
    _failing_for: float = 0.0

    def next_delay(self) -> float | None:
        """The wait before the next attempt, or None once `give_up_after` is spent."""
        self._delay = self.first if self._delay == 0 else min(self._delay * 2, self.cap)
        delay = self._delay * random.uniform(0.8, 1.2)
        if self._failing_for + delay > self.give_up_after:
            return None
        self._failing_for += delay
        return delay

    def reset(self) -> None:
        """A success: the next failure starts from `first` again."""
        self._delay = 0.0
        self._failing_for = 0.0
