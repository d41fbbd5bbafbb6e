"""Start billing_svc: `python -m billing_svc`."""

import sys

from billing_svc.server import App, build_app
from cyberdesk_common.service import run

_app: list[App] = []


def _build() -> object:
    _app.append(build_app())
    return _app[0].spec


async def _started(running: object) -> None:
    await _app[0].on_started(running)  # type: ignore[arg-type]


async def _stopping() -> None:
    await _app[0].on_stopping()


if __name__ == "__main__":
    sys.exit(run("billing_svc", _build, _started, _stopping))  # type: ignore[arg-type]
