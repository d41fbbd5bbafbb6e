"""INSTANCE_SVC_ON_SHUTDOWN, as read at start: keep (also when unset or empty), end, or a configuration error."""

from __future__ import annotations

import pytest

from cyberdesk_common.config import ConfigError
from instance_svc.server import ON_SHUTDOWN_ENV, on_shutdown_policy


@pytest.mark.parametrize(("value", "policy"), [(None, "keep"), ("", "keep"), ("keep", "keep"), ("end", "end")])
def test_the_policy_defaults_to_keep(monkeypatch: pytest.MonkeyPatch, value: str | None, policy: str) -> None:
    if value is None:
        monkeypatch.delenv(ON_SHUTDOWN_ENV, raising=False)
    else:
        monkeypatch.setenv(ON_SHUTDOWN_ENV, value)
    assert on_shutdown_policy() == policy


def test_another_value_is_a_configuration_error_naming_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ON_SHUTDOWN_ENV, "destroy")
    with pytest.raises(ConfigError) as err:
        on_shutdown_policy()
    assert str(err.value) == "INSTANCE_SVC_ON_SHUTDOWN='destroy': use keep or end"
