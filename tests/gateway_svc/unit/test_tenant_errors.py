"""What a tenant reads when an upstream call fails: the instance and the condition, never an address."""

from __future__ import annotations

import grpc
import pytest

from cyberdesk_common.lifecycle_events import InstanceState
from gateway_svc.tenant_errors import LOST_DURING_CALL, lost_call_status, tenant_message

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
SOCKET = "unix:/root/.local/state/cyberdesk/instances/sb-1/agent.sock"


@pytest.mark.parametrize(
    ("details", "expected"),
    [
        # grpc-core's own words when the agent's socket refuses or is gone (captured from grpcio).
        (
            f"failed to connect to all addresses; last error: FAILED_PRECONDITION: {SOCKET}: connect failed: "
            f"addr: {SOCKET} error: Connection refused",
            "instance i-1 is not reachable (its agent does not answer)",
        ),
        ("Connection refused", "instance i-1 is not reachable (its agent does not answer)"),
        ("", "instance i-1 is not reachable (its agent does not answer)"),
        # The agent died mid-call.
        (
            "Stream removed (Socket closed)",
            "instance i-1 is not reachable (the connection to its agent was lost during the call)",
        ),
        ("Socket closed", "instance i-1 is not reachable (the connection to its agent was lost during the call)"),
        # An UNAVAILABLE of unknown wording that names an address is still replaced.
        (f"some new grpc wording about {SOCKET}", "instance i-1 is not reachable (its agent does not answer)"),
    ],
)
def test_transport_failures_of_an_agent_name_the_instance_and_the_condition(details: str, expected: str) -> None:
    assert tenant_message("i-1", UNAVAILABLE, details) == expected


def test_an_upstreams_own_messages_pass_unchanged() -> None:
    # The agent's: paths inside the instance are the tenant's own.
    assert tenant_message("i-1", UNAVAILABLE, "input/output error on the device") == "input/output error on the device"
    dropped = "the service on port 3000 in the instance dropped the connection (Connection reset by peer)"
    assert tenant_message("i-1", UNAVAILABLE, dropped) == dropped
    missing = "/home/user/x: no such file or directory"
    assert tenant_message("i-1", grpc.StatusCode.NOT_FOUND, missing) == missing
    # instance_svc's.
    assert tenant_message("", grpc.StatusCode.NOT_FOUND, "instance i-9 not found") == "instance i-9 not found"


def test_instance_svc_unreachable_names_no_address() -> None:
    details = "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.7:50061: Connection refused"
    assert tenant_message("", UNAVAILABLE, details) == "the instance service is unreachable; retry shortly"


def test_any_code_naming_an_address_or_a_secret_is_replaced() -> None:
    message = tenant_message("i-1", grpc.StatusCode.INTERNAL, f"bad frame from {SOCKET}")
    assert message == "the call to instance i-1 failed (INTERNAL); retry, or report it with the time of the call"
    token = "agent-token-" + "x" * 30
    leaked = tenant_message("i-1", grpc.StatusCode.PERMISSION_DENIED, f"token {token} refused", secrets=[token])
    assert token not in leaked and "i-1" in leaked
    assert "instance service" in tenant_message("", grpc.StatusCode.UNKNOWN, "peer ipv6:[::1]:50061 sent garbage")


def test_a_lost_call_names_what_happened_to_its_instance() -> None:
    lost = f"instance i-1 is not reachable ({LOST_DURING_CALL})"
    unavailable, precondition = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION

    def status(state: InstanceState | None, why: str = "", message: str = lost) -> tuple[grpc.StatusCode, str]:
        return lost_call_status("i-1", state, why, unavailable, message)

    assert status(InstanceState.TERMINATED, "deleted") == (precondition, "instance i-1 was deleted")
    assert status(InstanceState.TERMINATED, "expired at its deadline") == (
        precondition,
        "instance i-1 was terminated: expired at its deadline",
    )
    assert status(InstanceState.STOPPING) == (precondition, "instance i-1 is being deleted (STOPPING)")
    assert status(InstanceState.FAILED, "out of memory") == (precondition, "instance i-1 is FAILED: out of memory")
    assert status(InstanceState.PAUSED) == (precondition, "instance i-1 was paused")
    assert status(InstanceState.RUNNING) == (
        unavailable,
        f"{lost}; instance_svc still reports it RUNNING, retry shortly",
    )
    never = "instance i-1 is not reachable (its agent does not answer)"
    assert status(InstanceState.RUNNING, message=never) == (unavailable, never)
    assert status(None) == (unavailable, lost)
