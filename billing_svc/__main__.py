"""Start billing_svc: `python -m billing_svc`."""

import sys

from billing_svc.server import build_app
from cyberdesk_common.service import run_app

if __name__ == "__main__":
    sys.exit(run_app("billing_svc", build_app))
