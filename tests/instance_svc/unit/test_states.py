"""The state machine table: every (state, request) pair and every (state, state) move."""

from __future__ import annotations

import pytest

from instance_svc.states import (
    ALLOWED,
    LIVE,
    TRANSITIONS,
    IllegalRequest,
    Request,
    State,
    check_request,
    check_transition,
)

LEGAL_REQUESTS = {
    (State.RUNNING, Request.PAUSE),
    (State.PAUSED, Request.RESUME),
    (State.RUNNING, Request.EXEC),
    (State.RUNNING, Request.SNAPSHOT),
    (State.PAUSED, Request.SNAPSHOT),
    (State.PENDING, Request.SET_TIMEOUT),
    (State.STARTING, Request.SET_TIMEOUT),
    (State.RUNNING, Request.SET_TIMEOUT),
    (State.PAUSED, Request.SET_TIMEOUT),
    *((s, Request.DELETE) for s in State),
}


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("request_", list(Request))
def test_request_table(state: State, request_: Request) -> None:
    if (state, request_) in LEGAL_REQUESTS:
        check_request("i-x", state, request_)
    else:
        with pytest.raises(IllegalRequest) as err:
            check_request("i-x", state, request_)
        assert f"instance i-x is {state.name}" in str(err.value)


def test_messages_name_the_state_and_what_is_needed() -> None:
    with pytest.raises(IllegalRequest, match="instance i-x is RUNNING; only a PAUSED instance can be resumed"):
        check_request("i-x", State.RUNNING, Request.RESUME)
    with pytest.raises(IllegalRequest, match="is PAUSED; only a RUNNING instance can be paused"):
        check_request("i-x", State.PAUSED, Request.PAUSE)
    with pytest.raises(IllegalRequest, match="is TERMINATED; only a PENDING, STARTING, RUNNING or PAUSED instance"):
        check_request("i-x", State.TERMINATED, Request.SET_TIMEOUT)


LEGAL_MOVES = {
    (State.PENDING, State.STARTING),
    (State.PENDING, State.FAILED),
    (State.STARTING, State.RUNNING),
    (State.STARTING, State.STOPPING),
    (State.STARTING, State.FAILED),
    (State.RUNNING, State.PAUSED),
    (State.RUNNING, State.STOPPING),
    (State.RUNNING, State.FAILED),
    (State.PAUSED, State.RUNNING),
    (State.PAUSED, State.STOPPING),
    (State.PAUSED, State.FAILED),
    (State.STOPPING, State.TERMINATED),
    (State.STOPPING, State.FAILED),
}


@pytest.mark.parametrize("old", list(State))
@pytest.mark.parametrize("new", list(State))
def test_transition_table(old: State, new: State) -> None:
    if (old, new) in LEGAL_MOVES:
        check_transition("i-x", old, new)
    else:
        with pytest.raises(IllegalRequest, match=f"is {old.name} and cannot become {new.name}"):
            check_transition("i-x", old, new)


def test_terminal_states_are_sinks_and_not_live() -> None:
    for state in (State.TERMINATED, State.FAILED):
        assert state.terminal and not TRANSITIONS[state] and state not in LIVE
    assert {State.PENDING, State.STARTING, State.RUNNING, State.PAUSED, State.STOPPING} == LIVE
    assert set(ALLOWED) == set(Request)
