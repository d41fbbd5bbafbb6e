"""Which instance this agent serves, and the environment its processes inherit.

The public services carry `instance_id` in every request so that the gateway can forward bytes
unchanged; the agent checks that the id names itself, so a mis-routed call can never act on the
wrong instance.
"""

from __future__ import annotations

import os

from cyberdesk_common.status import RpcError, invalid_argument, not_found


class Identity:
    """Mutable identity of the agent: bound once, at start or by a warm-pool claim."""

    def __init__(self, instance_id: str, base_env: dict[str, str] | None = None) -> None:
        self.instance_id = instance_id
        self.env: dict[str, str] = dict(os.environ if base_env is None else base_env)

    @property
    def display(self) -> str:
        """The X display of the instance's desktop, when it has one."""
        return self.env.get("DISPLAY", "")

    def bind(self, instance_id: str, env: dict[str, str]) -> None:
        """Serve `instance_id` from now on, with `env` on top of the current environment."""
        self.instance_id = instance_id
        self.env.update(env)

    def check(self, instance_id: str) -> None:
        """Raise unless `instance_id` names this agent's instance."""
        if not instance_id:
            raise invalid_argument("instance_id is required")
        if instance_id != self.instance_id:
            raise not_found(f"instance {instance_id} is not served by this agent") from None


__all__ = ["Identity", "RpcError"]
