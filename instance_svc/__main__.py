"""Start instance_svc: `python -m instance_svc`."""

import sys

from cyberdesk_common.service import run
from instance_svc.server import App, build_app

_app: list[App] = []


def _build() -> object:
    _app.append(build_app())
    return _app[0].spec


async def _started(running: object) -> None:
    await _app[0].on_started(running)  # type: ignore[arg-type]


async def _stopping() -> None:
    await _app[0].on_stopping()


if __name__ == "__main__":
    sys.exit(run("instance_svc", _build, _started, _stopping))  # type: ignore[arg-type]
