"""Where the SDK and the CLI find their endpoint and API key.

Resolution order, first hit wins: the explicit argument, the environment (`CYBERDESK_API_KEY`,
`CYBERDESK_ENDPOINT`, `CYBERDESK_HTTP_ENDPOINT`), the config file, the local default endpoint.
The config file is `~/.config/cyberdesk/config.json` (under `$XDG_CONFIG_HOME` when set, or
exactly `$CYBERDESK_CONFIG`), a JSON object written with mode 0600 because it holds a secret.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cyberdesk._errors import ConfigurationError

DEFAULT_ENDPOINT = "127.0.0.1:50051"
KEYS = ("endpoint", "http_endpoint", "api_key", "tenant")
_ENV = {
    "endpoint": "CYBERDESK_ENDPOINT",
    "http_endpoint": "CYBERDESK_HTTP_ENDPOINT",
    "api_key": "CYBERDESK_API_KEY",
    "tenant": "CYBERDESK_TENANT",
}


def config_path() -> Path:
    """The CLI config file's path (it need not exist)."""
    explicit = os.environ.get("CYBERDESK_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "cyberdesk" / "config.json"


def load_file(path: Path | None = None) -> dict[str, str]:
    """The config file's settings; empty when it does not exist."""
    path = path or config_path()
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ConfigurationError(f"cannot read {path}: {err.strerror}") from None
    try:
        data = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as err:
        raise ConfigurationError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}); fix or delete it"
        ) from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path} must hold a JSON object")
    return {str(k): str(v) for k, v in data.items() if v is not None}


def save_file(values: dict[str, str], path: Path | None = None) -> Path:
    """Merge `values` into the config file, atomically and with mode 0600."""
    path = path or config_path()
    current = load_file(path)
    current.update(values)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Written to a 0600 temporary file then renamed: the key is never readable by others, not
    # even for a moment, and a crash never leaves a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(current, out, indent=2, sort_keys=True)
            out.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def setting(name: str, explicit: str | None = None) -> str | None:
    """One setting by the resolution order: argument, environment, config file."""
    if name not in KEYS:
        raise ConfigurationError(f"unknown setting {name!r}; known: {', '.join(KEYS)}")
    if explicit:
        return explicit
    env = os.environ.get(_ENV[name])
    if env:
        return env
    return load_file().get(name) or None


@dataclass(frozen=True)
class ClientConfig:
    """What a client connects with."""

    endpoint: str
    api_key: str
    secure: bool

    @property
    def target(self) -> str:
        """host:port for gRPC."""
        return self.endpoint


def resolve(api_key: str | None = None, endpoint: str | None = None) -> ClientConfig:
    """Endpoint and key by the resolution order; raises ConfigurationError when no key is found."""
    key = setting("api_key", api_key)
    if not key:
        raise ConfigurationError(
            "no API key: pass api_key=..., set CYBERDESK_API_KEY, or run `cyberdesk up` "
            f"(it writes one to {config_path()})"
        )
    raw = setting("endpoint", endpoint) or DEFAULT_ENDPOINT
    target, secure = parse_endpoint(raw)
    return ClientConfig(endpoint=target, api_key=key, secure=secure)


def parse_endpoint(raw: str) -> tuple[str, bool]:
    """host:port and whether to use TLS, from `host:port`, `grpc://`, `grpcs://`, `http://` or `https://`."""
    value = raw.strip()
    secure = False
    for scheme, tls in (("grpcs://", True), ("https://", True), ("grpc://", False), ("http://", False)):
        if value.startswith(scheme):
            value, secure = value[len(scheme) :], tls
            break
    value = value.rstrip("/")
    host, sep, port = value.rpartition(":")
    if "/" in value or not value:
        raise ConfigurationError(f"endpoint {raw!r} is not host:port (e.g. 127.0.0.1:50051 or grpcs://api.example.com)")
    if not sep:
        return f"{value}:{443 if secure else 50051}", secure
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"endpoint {raw!r} is not host:port (e.g. 127.0.0.1:50051)")
    return value, secure
