"""A stand-in for the gateway's route cache that records what the event follower tells it."""

from __future__ import annotations

from cyberdesk_common.lifecycle_events import LifecycleEvent


class RecordingRoutes:
    """A `gateway_svc.routing.FollowsEvents`: the events applied, in order, and how often routes were cleared."""

    def __init__(self) -> None:
        self.applied: list[LifecycleEvent] = []
        self.cleared = 0

    def apply(self, event: LifecycleEvent) -> None:
        """Record one event."""
        self.applied.append(event)

    def clear(self) -> None:
        """Count one "forget every route"."""
        self.cleared += 1
