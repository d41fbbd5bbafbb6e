"""How DesktopService translates key combinations into xdotool's names (no display needed)."""

from __future__ import annotations

from guest_agent.desktop import parse_combo


def test_key_combinations_are_translated() -> None:
    assert parse_combo("ctrl+shift+t") == "ctrl+shift+t"
    assert parse_combo("Control+Enter") == "ctrl+Return"
    assert parse_combo("esc") == "Escape"
    assert parse_combo("cmd+f5") == "super+F5"
    assert parse_combo("ctrl++") == "ctrl+plus"
    assert parse_combo("ctrl+-") == "ctrl+minus"
    assert parse_combo("KP_Enter") == "KP_Enter"
    assert parse_combo("€") == "U20AC"
