"""What a tenant is told when a call behind the gateway fails: the instance and the condition.

grpc-core makes a status itself when the transport fails (no server answered, or the connection
dropped), and its details name the peer's address: an agent's unix socket under the platform's
state directory (`unix:/.../instances/<sandbox>/agent.sock`), or a host:port inside the cluster.
Neither is the tenant's business, and a path tells an attacker where the platform keeps its
secrets. The gateway forwards an upstream's own messages unchanged (an agent's "no such file
/home/user/x", instance_svc's "instance i-1 not found": they speak of the tenant's things), and
replaces transport messages, and anything naming an address or a secret, with a sentence; the
raw details go to the gateway's log (see `Admission.upstream_failed`).

A call to an agent that is lost mid-way is usually not an outage: the instance was deleted,
paused, timed out or failed under it. `lost_call_status` says which, from the instance's state
(the gateway's route cache asks instance_svc, see `RouteCache.explain_lost`), instead of the
generic "not reachable".
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from cyberdesk_common.lifecycle_events import InstanceState

# How grpc-core begins the details of a status it made because the transport failed, compared in
# lower case (its wording comes from strerror and varies in case). Matched at the start only: an
# agent's own message may quote an errno text further in ("the service on port 3000 in the
# instance dropped the connection (Connection reset by peer)") and must pass as it is. A dropped
# connection and one that could not be made are told apart: the first may have run part of the
# call.
_LOST_PREFIXES = (
    "stream removed",
    "socket closed",
    "connection reset",
    "broken pipe",
    "goaway",
    "transport closed",
    "cancelling all calls",
)
_CONNECT_PREFIXES = (
    "failed to connect to all addresses",
    "connections to all backends failing",
    "connection refused",
    "dns resolution failed",
    "empty address list",
    "handshake failed",
    "endpoint",
    "keepalive watchdog timeout",
)
# Peer addresses as grpc-core prints them (resolved: a socket path or an IP, never a DNS name).
# None of our services writes these in a message of its own.
_ADDRESS_MARKERS = ("unix:/", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")
LOST_DURING_CALL = "the connection to its agent was lost during the call"


def tenant_message(
    instance_id: str,
    code: grpc.StatusCode,
    details: str,
    secrets: Iterable[str] = (),
    upstream: str = "the instance service",
) -> str:
    """What a tenant is told about a failed upstream call: the instance and the condition, no address.

    `instance_id` is "" for a call to instance_svc (or billing_svc: `upstream` names it). An
    upstream's own message (an agent's "no such file /home/user/x", instance_svc's "instance i-1
    not found") passes unchanged; grpc-core's
    transport messages, and anything naming an address or one of `secrets` (the agent's token,
    the internal token), become a sentence about the condition. Pure: the caller logs `details`.
    """
    text = details or ""
    secrets = tuple(secrets)
    leaks = any(marker in text for marker in _ADDRESS_MARKERS) or any(s and s in text for s in secrets)
    lowered = text.lower()
    lost = lowered.startswith(_LOST_PREFIXES)
    unreachable = lost or lowered.startswith(_CONNECT_PREFIXES)
    if code is grpc.StatusCode.UNAVAILABLE and (unreachable or leaks or not text):
        if not instance_id:
            return f"{upstream} is unreachable; retry shortly"
        if lost:
            return f"instance {instance_id} is not reachable ({LOST_DURING_CALL})"
        return f"instance {instance_id} is not reachable (its agent does not answer)"
    if leaks:
        where = f"instance {instance_id}" if instance_id else upstream
        return f"the call to {where} failed ({code.name}); retry, or report it with the time of the call"
    return text


def lost_call_status(
    instance_id: str, state: InstanceState | None, state_message: str, code: grpc.StatusCode, message: str
) -> tuple[grpc.StatusCode, str]:
    """The status of a call to an agent that failed (UNAVAILABLE, CANCELLED) given the instance's state.

    `code`/`message` are what the caller would get otherwise (already free of addresses). The
    instance deleted, terminated at its deadline, failed or paused: FAILED_PRECONDITION saying so
    (the same code as a call made after the change); still RUNNING after a connection lost during
    the call (the agent itself died, or instance_svc has not noticed yet): the original
    UNAVAILABLE, naming the state. An agent that never answered stays "does not answer". Unknown
    state (None): unchanged. Pure.
    """
    precondition = grpc.StatusCode.FAILED_PRECONDITION
    why = state_message.strip()
    if state is InstanceState.TERMINATED:
        if why in ("", "deleted"):
            return precondition, f"instance {instance_id} was deleted"
        return precondition, f"instance {instance_id} was terminated: {why}"
    if state is InstanceState.STOPPING:
        return precondition, f"instance {instance_id} is being deleted (STOPPING)"
    if state is InstanceState.FAILED:
        return precondition, f"instance {instance_id} is FAILED: {why}" if why else f"instance {instance_id} is FAILED"
    if state is InstanceState.PAUSED:
        return precondition, f"instance {instance_id} was paused" + (f": {why}" if why else "")
    if state is InstanceState.RUNNING and code is grpc.StatusCode.UNAVAILABLE and LOST_DURING_CALL in message:
        return code, f"{message}; instance_svc still reports it RUNNING, retry shortly"
    return code, message
