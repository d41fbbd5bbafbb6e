"""Start instance_svc: `python -m instance_svc`."""

import sys

from cyberdesk_common.service import run_app
from instance_svc.server import build_app

if __name__ == "__main__":
    sys.exit(run_app("instance_svc", build_app))
