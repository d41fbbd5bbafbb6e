"""Start gateway_svc: `python -m gateway_svc`."""

import sys

from cyberdesk_common.service import run
from gateway_svc.server import build_spec

if __name__ == "__main__":
    sys.exit(run("gateway_svc", build_spec))
