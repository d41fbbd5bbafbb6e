"""Configuration helpers: defaults, parsing, and errors that name the variable."""

from pathlib import Path

import pytest

from cyberdesk_common.config import ConfigError, env_bool, env_int, env_str
from cyberdesk_common.log import redact


def test_defaults_and_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CYBERDESK_X", raising=False)
    assert env_int("X", 7) == 7
    monkeypatch.setenv("CYBERDESK_X", "42")
    assert env_int("X", 7) == 42
    assert env_str("X", "d") == "42"
    monkeypatch.setenv("CYBERDESK_X", "off")
    assert env_bool("X", True) is False


@pytest.mark.parametrize(("value", "fn"), [("4x", env_int), ("maybe", env_bool)])
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, value: str, fn: object) -> None:
    monkeypatch.setenv("CYBERDESK_X", value)
    with pytest.raises(ConfigError, match="CYBERDESK_X"):
        fn("X", 1)  # type: ignore[operator]


def test_minimum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CYBERDESK_X", "0")
    with pytest.raises(ConfigError, match="minimum"):
        env_int("X", 1, minimum=1)


def test_redact_masks_secrets_but_not_ids() -> None:
    assert redact("agent_token", "abc") == "***"
    assert redact("authorization", "Bearer x") == "***"
    assert redact("key_id", "k-1") == "k-1"
    assert redact("method", "/x") == "/x"


def test_internal_token_is_created_once_0600(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cyberdesk_common.config import internal_token

    monkeypatch.delenv("CYBERDESK_INTERNAL_TOKEN", raising=False)
    first = internal_token(tmp_path)
    assert len(first) >= 32
    assert internal_token(tmp_path) == first
    assert (tmp_path / "internal_token").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("CYBERDESK_INTERNAL_TOKEN", "from-env")
    assert internal_token(tmp_path) == "from-env"
