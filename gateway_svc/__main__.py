"""Start gateway_svc: `python -m gateway_svc`; manage local keys: `python -m gateway_svc keys ...`."""

import sys

from cyberdesk_common.service import run
from gateway_svc.config import GatewayConfig
from gateway_svc.server import Gateway, build_spec


def _serve() -> int:
    holder: dict[str, Gateway] = {}

    def build():  # type: ignore[no-untyped-def]
        holder["gw"] = Gateway(GatewayConfig.from_env())
        return build_spec(holder["gw"])

    async def on_started(running):  # type: ignore[no-untyped-def]
        await holder["gw"].on_started(running)

    async def on_stopping() -> None:
        await holder["gw"].on_stopping()

    return run("gateway_svc", build, on_started, on_stopping)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "keys":
        from gateway_svc.cli import main

        sys.exit(main(sys.argv[2:]))
    sys.exit(_serve())
