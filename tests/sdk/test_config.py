"""Where the SDK finds its endpoint and key: argument, environment, config file, default."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cyberdesk import ConfigurationError
from cyberdesk._config import config_path, load_file, parse_endpoint, resolve, save_file, setting


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "conf" / "config.json"
    monkeypatch.setenv("CYBERDESK_CONFIG", str(path))
    for name in ("CYBERDESK_API_KEY", "CYBERDESK_ENDPOINT", "CYBERDESK_HTTP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    return path


def test_order_argument_then_env_then_file(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_file({"api_key": "cd_file", "endpoint": "10.0.0.1:1"})
    assert resolve().api_key == "cd_file"
    assert resolve().endpoint == "10.0.0.1:1"
    monkeypatch.setenv("CYBERDESK_API_KEY", "cd_env")
    monkeypatch.setenv("CYBERDESK_ENDPOINT", "10.0.0.2:2")
    assert (resolve().api_key, resolve().endpoint) == ("cd_env", "10.0.0.2:2")
    explicit = resolve(api_key="cd_arg", endpoint="10.0.0.3:3")
    assert (explicit.api_key, explicit.endpoint) == ("cd_arg", "10.0.0.3:3")


def test_default_endpoint_and_missing_key(cfg: Path) -> None:
    with pytest.raises(ConfigurationError, match="no API key"):
        resolve()
    assert resolve(api_key="k").endpoint == "127.0.0.1:50051"


def test_file_is_private_and_merged(cfg: Path) -> None:
    save_file({"endpoint": "h:1"})
    save_file({"api_key": "secret"})
    assert load_file() == {"endpoint": "h:1", "api_key": "secret"}
    assert stat.S_IMODE(os.stat(cfg).st_mode) == 0o600
    assert json.loads(cfg.read_text())["api_key"] == "secret"


def test_broken_file_is_a_clear_error(cfg: Path) -> None:
    cfg.parent.mkdir(parents=True)
    cfg.write_text("{not json")
    with pytest.raises(ConfigurationError, match="not valid JSON"):
        resolve(api_key="k")
    cfg.write_text("[1, 2]")
    with pytest.raises(ConfigurationError, match="JSON object"):
        load_file()


def test_unknown_setting(cfg: Path) -> None:
    with pytest.raises(ConfigurationError, match="unknown setting"):
        setting("colour")


def test_xdg_config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CYBERDESK_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert config_path() == tmp_path / "cyberdesk" / "config.json"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("127.0.0.1:50051", ("127.0.0.1:50051", False)),
        ("grpc://h:7", ("h:7", False)),
        ("grpcs://api.example.com", ("api.example.com:443", True)),
        ("https://api.example.com:8443/", ("api.example.com:8443", True)),
        ("localhost", ("localhost:50051", False)),
    ],
)
def test_parse_endpoint(raw: str, expected: tuple[str, bool]) -> None:
    assert parse_endpoint(raw) == expected


@pytest.mark.parametrize("raw", ["", "h:0", "h:99999", "h:port", "http://h:1/path"])
def test_bad_endpoint(raw: str) -> None:
    with pytest.raises(ConfigurationError, match="host:port"):
        parse_endpoint(raw)


def test_import_is_light() -> None:
    """The guest agent imports cyberdesk.v1 inside sandboxes: `import cyberdesk` must not pull in grpc."""
    code = "import sys, cyberdesk; assert 'grpc' not in sys.modules, 'grpc imported'; cyberdesk.Cyberdesk; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
