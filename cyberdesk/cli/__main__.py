"""`python -m cyberdesk.cli ...`, the same as the `cyberdesk` command."""

import sys

from cyberdesk.cli._main import main

sys.exit(main())
