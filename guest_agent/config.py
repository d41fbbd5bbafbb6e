"""Agent settings, from environment variables (read once at start-up)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cyberdesk_common.config import ConfigError, env_float, env_str


@dataclass(frozen=True)
class AgentConfig:
    """Where the agent listens and how callers prove they may talk to it."""

    # "unix:///path/agent.sock" for local sandboxes, "0.0.0.0:49983" (TLS) for virtual machines.
    listen: str
    token: str
    instance_id: str
    tls_cert: bytes | None
    tls_key: bytes | None
    grace_seconds: float

    @classmethod
    def from_env(cls) -> AgentConfig:
        """Read the configuration; the token is removed from the environment so children never see it."""
        token = os.environ.pop("CYBERDESK_AGENT_TOKEN", "")
        token_file = env_str("AGENT_TOKEN_FILE", "")
        if token_file:
            token = Path(token_file).read_text().strip()
        if len(token) < 16:
            raise ConfigError(
                "the agent needs a token of at least 16 characters in CYBERDESK_AGENT_TOKEN "
                "or in the file named by CYBERDESK_AGENT_TOKEN_FILE"
            )
        listen = env_str("AGENT_LISTEN", "unix:///run/cyberdesk/agent.sock")
        cert_file, key_file = env_str("AGENT_TLS_CERT", ""), env_str("AGENT_TLS_KEY", "")
        if not listen.startswith("unix:") and not (cert_file and key_file):
            raise ConfigError(
                f"CYBERDESK_AGENT_LISTEN={listen} is a TCP address: set CYBERDESK_AGENT_TLS_CERT and "
                "CYBERDESK_AGENT_TLS_KEY, the agent never serves TCP in clear text"
            )
        return cls(
            listen=listen,
            token=token,
            instance_id=env_str("AGENT_INSTANCE_ID", ""),
            tls_cert=Path(cert_file).read_bytes() if cert_file else None,
            tls_key=Path(key_file).read_bytes() if key_file else None,
            grace_seconds=env_float("AGENT_GRACE_SECONDS", 5.0),
        )
