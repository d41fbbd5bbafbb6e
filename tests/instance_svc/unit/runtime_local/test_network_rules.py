"""The egress policy's pure parts (instance_svc/runtime/local/network.py): resolution and the nft ruleset text.

The ruleset is loaded into real sandboxes by tests/instance_svc/integration/test_egress.py; these
tests pin its order, which is what makes deny win and keeps the fixed denials out of reach.
"""

from __future__ import annotations

import ipaddress
import re

import pytest

from instance_svc.runtime.local import network


def _resolver(table: dict[str, list[str]]) -> network.Resolver:
    def resolve(name: str) -> list[str]:
        if name not in table:
            raise OSError(f"[Errno -2] Name or service not known: {name}")
        return table[name]

    return resolve


def _policy(**kw: object) -> network.Policy:
    fields: dict[str, object] = {
        "allow": None,
        "deny": network.Destinations(),
        "operator_ranges": network.Destinations(),
        "host": network.Destinations.of([ipaddress.ip_network("192.0.2.2/32"), ipaddress.ip_network("fd00::2/128")]),
        **kw,
    }
    return network.Policy(**fields)  # type: ignore[arg-type]


def _chain(rules: str, name: str) -> list[str]:
    """The rules of one chain (each on its own line; the chain closes with a "  }" line)."""
    body = rules.split(f"chain {name} {{\n", 1)[1].split("\n  }", 1)[0]
    return [line.strip() for line in body.splitlines()]


def test_names_resolve_best_effort_and_wildcards_are_left_to_the_guard() -> None:
    resolver = _resolver({"pypi.org": ["151.101.0.223", "2a04:4e42::223"], "example.com": ["203.0.113.7"]})
    dest = network.resolve(["pypi.org", "*.example.com", "198.18.0.0/15", "198.18.1.1", "nowhere.invalid"], resolver)
    assert [str(n) for n in dest.v4] == ["151.101.0.223/32", "198.18.0.0/15"]
    assert [str(n) for n in dest.v6] == ["2a04:4e42::223/128"]
    assert network.is_name("*.example.com") and network.is_name("pypi.org") and not network.is_name("::1")
    assert network.resolver_address(["198.18.0.0/15"], []) == "10.0.2.3"
    assert network.resolver_address(["198.18.0.0/15"], ["*.example.com"]) == "127.0.0.53"


def test_with_names_only_the_guard_reaches_dns_and_learned_addresses_are_allowed() -> None:
    rules = network.ruleset(
        _policy(allow=network.Destinations(), allow_names=("*.example.com",), dns_upstream="198.18.73.2")
    )
    out = _chain(rules, "output")
    assert out[2:5] == [
        "ct state established,related accept",
        "ip daddr 198.18.73.2 meta mark 0x43440001 udp dport 53 accept",
        "ip daddr 198.18.73.2 meta mark 0x43440001 tcp dport 53 accept",
    ]
    assert "ip daddr 10.0.2.3 udp dport 53 accept" not in rules
    assert _chain(rules, "allowlist") == [
        "ip daddr @dyn_allow_v4 accept",
        "ip6 daddr @dyn_allow_v6 accept",
        "goto refuse",
    ]
    assert "set dyn_allow_v4 {" in rules and "flags timeout" in rules


def test_operator_ranges_parse_or_name_the_bad_entry() -> None:
    assert [str(n) for n in network.parse_ranges(" 10.20.0.0/16, ,fc00:1::/32")] == ["10.20.0.0/16", "fc00:1::/32"]
    assert network.parse_ranges("") == ()
    with pytest.raises(ValueError, match=re.escape("'10.20.0.1/16' is not a CIDR")):
        network.parse_ranges("10.20.0.1/16")


def test_order_dns_then_fixed_denials_then_deny_then_operator_then_private_then_allow() -> None:
    rules = network.ruleset(
        _policy(
            allow=network.Destinations.of([ipaddress.ip_network("198.18.71.2/32")]),
            deny=network.Destinations.of([ipaddress.ip_network("198.18.72.0/24")]),
            operator_ranges=network.Destinations.of([ipaddress.ip_network("100.64.71.0/24")]),
        )
    )
    out = _chain(rules, "output")
    assert out[0] == "type filter hook output priority filter; policy drop;"
    assert out[1] == 'oifname "lo" accept'
    assert out[2:4] == ["ip daddr 10.0.2.3 udp dport 53 accept", "ip daddr 10.0.2.3 tcp dport 53 accept"]
    fixed = out[4]
    for net in ("10.0.2.0/24", "127.0.0.0/8", "169.254.0.0/16", "0.0.0.0/8"):
        assert net in fixed
    assert fixed.endswith("goto refuse")
    assert "fe80::/10" in out[5] and "::/127" in out[5]  # ::/128 and ::1/128, collapsed
    assert out[6] == "ip daddr { 192.0.2.2/32 } goto refuse" and out[7] == "ip6 daddr { fd00::2/128 } goto refuse"
    assert out[8] == "ip daddr { 198.18.72.0/24 } goto refuse"  # deny before the operator and the allow list
    assert out[9] == "ip daddr { 100.64.71.0/24 } goto allowlist"
    assert out[10].startswith("ip daddr { 10.0.0.0/8, 100.64.0.0/10, 172.16.0.0/12, 192.168.0.0/16 }")
    assert out[11] == "ip6 daddr { fc00::/7 } goto refuse"
    assert out[12] == "goto allowlist"
    assert _chain(rules, "allowlist") == ["ip daddr { 198.18.71.2/32 } accept", "goto refuse"]
    assert _chain(rules, "refuse") == [
        "meta l4proto tcp reject with tcp reset",
        "reject with icmpx type admin-prohibited",
    ]
    # Chains that are jumped to are declared first (nft resolves names as it reads).
    assert rules.index("chain refuse") < rules.index("chain allowlist") < rules.index("chain output")


def test_without_an_allow_list_everything_public_is_accepted_and_empty_sets_are_left_out() -> None:
    rules = network.ruleset(_policy(host=network.Destinations()))
    assert _chain(rules, "allowlist") == ["accept"]
    assert "{ }" not in rules
    assert "fd00::2" not in rules


def test_overlapping_entries_are_collapsed_for_nft() -> None:
    dest = network.Destinations.of(
        [ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("198.18.71.2/32"), ipaddress.ip_network("::1/128")]
    )
    assert [str(n) for n in dest.v4] == ["198.18.0.0/15"] and [str(n) for n in dest.v6] == ["::1/128"]
