"""Start the guest agent: `python -m guest_agent`."""

from __future__ import annotations

import os
import sys

from cyberdesk_common.grpc_server import ServerSpec
from cyberdesk_common.service import run
from guest_agent.config import AgentConfig
from guest_agent.identity import Identity
from guest_agent.server import build_spec


def _build() -> ServerSpec:
    config = AgentConfig.from_env()
    if config.listen.startswith("unix:"):
        # A stale socket from a previous run would make the bind fail.
        path = config.listen.removeprefix("unix://").removeprefix("unix:")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)
    return build_spec(config, Identity(config.instance_id))


if __name__ == "__main__":
    sys.exit(run("guest_agent", _build))
