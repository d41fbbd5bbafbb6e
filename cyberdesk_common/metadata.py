"""Names of the gRPC metadata our own processes exchange, defined once for every service.

- The gateway tells instance_svc which tenant a call is for (`TENANT_METADATA`); instance_svc
  believes it only when the same call carries the shared internal secret
  (`INTERNAL_TOKEN_METADATA`), so a tenant can never claim another tenant by sending the header
  itself (the gateway strips every `x-cyberdesk-*` header a caller sends, see
  `gateway_svc/admission.py`).
- A guest agent accepts a call only with `authorization: Bearer <instance token>`
  (`agent_metadata`); the gateway and instance_svc build that pair here, the agent checks it
  in `guest_agent/auth.py`.
"""

from __future__ import annotations

INTERNAL_TOKEN_METADATA = "x-cyberdesk-internal-token"
TENANT_METADATA = "x-cyberdesk-tenant"
# Every header with this prefix is ours: never accepted from a caller, never forwarded from one.
INTERNAL_METADATA_PREFIX = "x-cyberdesk-"
AUTHORIZATION_METADATA = "authorization"


def bearer(token: str) -> str:
    """The `authorization` value that presents `token`."""
    return f"Bearer {token}"


def agent_metadata(token: str) -> tuple[tuple[str, str]]:
    """The call metadata a guest agent requires: its per-instance token as a bearer credential."""
    return ((AUTHORIZATION_METADATA, bearer(token)),)


def internal_metadata(tenant_id: str, internal_token: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """The call metadata instance_svc requires from the gateway: the verified tenant and the secret."""
    return ((TENANT_METADATA, tenant_id), (INTERNAL_TOKEN_METADATA, internal_token))
