"""Configuration from environment variables.

Every service reads its settings through these helpers so that names, defaults and error messages
look the same everywhere: `CYBERDESK_<NAME>`, with a default that works on one machine.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PREFIX = "CYBERDESK_"


class ConfigError(ValueError):
    """A setting is present but unusable; the message names the variable and the expected form."""


def _raw(name: str) -> str | None:
    value = os.environ.get(PREFIX + name)
    return value if value not in (None, "") else None


def env_str(name: str, default: str) -> str:
    """The string value of CYBERDESK_<name>, or `default`."""
    value = _raw(name)
    return default if value is None else value


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    """The integer value of CYBERDESK_<name>, or `default`."""
    value = _raw(name)
    if value is None:
        return default
    try:
        parsed = int(value)
    except ValueError:
        raise ConfigError(f"{PREFIX}{name}={value!r} is not an integer") from None
    if minimum is not None and parsed < minimum:
        raise ConfigError(f"{PREFIX}{name}={parsed} is below the minimum {minimum}")
    return parsed


def env_float(name: str, default: float) -> float:
    """The float value of CYBERDESK_<name>, or `default`."""
    value = _raw(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{PREFIX}{name}={value!r} is not a number") from None


def env_bool(name: str, default: bool) -> bool:
    """The boolean value of CYBERDESK_<name> (1/0, true/false, yes/no, on/off), or `default`."""
    value = _raw(name)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{PREFIX}{name}={value!r} is not a boolean (use true or false)")


def state_dir() -> Path:
    """The platform's state directory (databases, keys, instance directories).

    Defaults to ~/.local/state/cyberdesk, never inside the checkout, so that a sandbox that can see
    the checkout still cannot see the platform's state.
    """
    default = Path.home() / ".local" / "state" / "cyberdesk"
    path = Path(env_str("STATE_DIR", str(default))).expanduser()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def internal_token(base: Path | None = None) -> str:
    """The secret that our own services present to each other (gateway -> instance_svc).

    CYBERDESK_INTERNAL_TOKEN when set; else the file <state_dir>/internal_token, created with
    mode 0600 on first use so that every service of one machine shares it without configuration.
    """
    value = _raw("INTERNAL_TOKEN")
    if value is not None:
        return value
    path = (base or state_dir()) / "internal_token"
    try:
        # O_EXCL: two services starting at once cannot both write a different secret.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text().strip()
        if len(token) < 32:
            raise ConfigError(f"{path} holds no usable internal token; delete it to create a new one") from None
        return token
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token


# Where `cyberdesk up` starts its own redis-server (cyberdesk_stack.launcher.StackOptions.redis_port).
LOCAL_REDIS_PORT = 6390


def platform_redis_url(base: Path | None = None) -> str:
    """The URL of the platform's Redis, credentials included.

    CYBERDESK_REDIS_URL, else REDIS_URL (what `cyberdesk up` and Kubernetes hand every service),
    else the local stack's Redis on 127.0.0.1:6390 with the password `cyberdesk up` keeps in
    <state_dir>/redis_password, so a service started by hand beside the stack finds it without
    being told the secret. The URL is a secret itself: never log it (cyberdesk_common.log masks
    its password if it slips into a line).
    """
    for value in (_raw("REDIS_URL"), os.environ.get("REDIS_URL") or None):
        if value is not None:
            return value
    path = (base or state_dir()) / "redis_password"
    try:
        password = path.read_text().strip()
    except FileNotFoundError:
        return f"redis://127.0.0.1:{LOCAL_REDIS_PORT}/0"
    return f"redis://:{password}@127.0.0.1:{LOCAL_REDIS_PORT}/0"
