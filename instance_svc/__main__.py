"""Start instance_svc: `python -m instance_svc`."""

import sys

from cyberdesk_common.service import run
from instance_svc.server import build_spec

if __name__ == "__main__":
    sys.exit(run("instance_svc", build_spec))
