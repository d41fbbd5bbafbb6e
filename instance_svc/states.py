"""The lifecycle state machine of an instance, as pure code.

Two tables say everything: which state may follow which (`TRANSITIONS`), and in which states a
request is allowed (`ALLOWED`). The lifecycle module asks `check_request` before acting and
`check_transition` before writing a new state, so an illegal move is a precise error and never
a corrupt record.
"""

from __future__ import annotations

import enum

from cyberdesk_common.lifecycle_events import InstanceState

# The states are a cross-service fact (the lifecycle event carries them to every consumer), so
# they are defined once in the shared package; `State` is their name inside instance_svc.
State = InstanceState


# Non-terminal states count against a tenant's quota: the instance holds (or is about to hold,
# or is still releasing) a sandbox.
LIVE: frozenset[State] = frozenset(s for s in State if not s.terminal)

TRANSITIONS: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.STARTING, State.FAILED}),
    State.STARTING: frozenset({State.RUNNING, State.STOPPING, State.FAILED}),
    State.RUNNING: frozenset({State.PAUSED, State.STOPPING, State.FAILED}),
    State.PAUSED: frozenset({State.RUNNING, State.STOPPING, State.FAILED}),
    State.STOPPING: frozenset({State.TERMINATED, State.FAILED}),
    State.TERMINATED: frozenset(),
    State.FAILED: frozenset(),
}


class Request(enum.Enum):
    """What a caller (or the deadline) asks of an instance."""

    PAUSE = "paused"
    RESUME = "resumed"
    SET_TIMEOUT = "given a new timeout"
    SNAPSHOT = "snapshotted"
    EXEC = "used (processes, files, desktop)"
    DELETE = "deleted"


ALLOWED: dict[Request, frozenset[State]] = {
    Request.PAUSE: frozenset({State.RUNNING}),
    Request.RESUME: frozenset({State.PAUSED}),
    Request.SET_TIMEOUT: frozenset({State.PENDING, State.STARTING, State.RUNNING, State.PAUSED}),
    Request.SNAPSHOT: frozenset({State.RUNNING, State.PAUSED}),
    Request.EXEC: frozenset({State.RUNNING}),
    # Delete of a terminal instance is a no-op success (idempotent); every state accepts it.
    Request.DELETE: frozenset(State),
}


class IllegalRequest(Exception):
    """The request is valid but the instance's state does not allow it (FAILED_PRECONDITION)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _names(states: frozenset[State]) -> str:
    ordered = [s.name for s in State if s in states]
    return ordered[0] if len(ordered) == 1 else ", ".join(ordered[:-1]) + " or " + ordered[-1]


def check_request(instance_id: str, state: State, request: Request) -> None:
    """Raise IllegalRequest, naming the state, unless `request` is allowed in `state`."""
    allowed = ALLOWED[request]
    if state not in allowed:
        raise IllegalRequest(
            f"instance {instance_id} is {state.name}; only a {_names(allowed)} instance can be {request.value}"
        )


def check_transition(instance_id: str, old: State, new: State) -> None:
    """Raise IllegalRequest unless the machine may move from `old` to `new`."""
    if new not in TRANSITIONS[old]:
        raise IllegalRequest(f"instance {instance_id} is {old.name} and cannot become {new.name}")
