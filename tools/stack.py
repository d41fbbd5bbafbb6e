"""`make run` before the CLI existed; now the same as `cyberdesk up` (the logic lives in cyberdesk/_stack.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cyberdesk._stack import main

if __name__ == "__main__":
    sys.exit(main())
