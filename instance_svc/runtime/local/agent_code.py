"""Which of our code and which installed packages a sandbox binds read-only for its guest agent."""

from __future__ import annotations

import sys
from pathlib import Path

from instance_svc.runtime.base import RuntimeError_


def package_dirs() -> list[Path]:
    """The top-level packages the agent imports, and nothing else of ours.

    guest_agent, cyberdesk_common, the generated cyberdesk_proto, and the SDK package for its one
    dependency-free helper (`keep_large_blocks`). Not the launcher (cyberdesk_stack), not the other
    services, not the checkout.
    """
    import cyberdesk
    import cyberdesk_common
    import cyberdesk_proto
    import guest_agent

    return [
        Path(guest_agent.__file__).parent,
        Path(cyberdesk_common.__file__).parent,
        Path(next(iter(cyberdesk_proto.__path__))),
        Path(cyberdesk.__file__).parent,
    ]


def site_packages() -> Path:
    """The site-packages dir holding grpcio (and the agent's other dependencies) for this interpreter."""
    for entry in sys.path:
        if entry.endswith("site-packages") and Path(entry, "grpc").is_dir():
            return Path(entry)
    raise RuntimeError_("cannot find the site-packages dir holding grpcio for the guest agent")
