"""Entry point: the agent stand-in (see upstream.py)."""

import asyncio

from cyberdesk_common.grpc_server import serve
from cyberdesk_common.log import setup_logging
from tests.gateway_svc.upstream import spec

if __name__ == "__main__":
    setup_logging("upstream")
    asyncio.run(serve(spec("agent")))
