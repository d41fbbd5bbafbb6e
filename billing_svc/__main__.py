"""Start billing_svc: `python -m billing_svc`."""

import sys

from billing_svc.server import build_spec
from cyberdesk_common.service import run

if __name__ == "__main__":
    sys.exit(run("billing_svc", build_spec))
