"""`python -m instance_svc.operator`: the instance operator (settings: CYBERDESK_OPERATOR_*, KUBECONFIG).

CYBERDESK_OPERATOR_NAMESPACE (default "cyberdesk"), _ID (default host-pid), _PRIORITY (random),
_PEERING_LIFETIME (60 s), _AGENT_TIMEOUT (3 s), _RETRY_MAX (2 s), _STANDALONE (false).
"""

from __future__ import annotations

import asyncio
import logging
import sys

from cyberdesk_common.config import ConfigError, env_str
from cyberdesk_common.log import setup_logging
from instance_svc.operator.app import run


def main() -> int:
    setup_logging("instance_operator", env_str("LOG_LEVEL", "INFO"))
    # kopf logs every handler run at INFO (each watch event runs one): only its warnings are news.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        asyncio.run(run())
    except ConfigError as e:
        print(f"instance operator: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
