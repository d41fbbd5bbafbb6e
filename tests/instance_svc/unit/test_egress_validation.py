"""EgressPolicy validation on create (instance_svc/validation.py): normalised entries, errors naming the entry."""

from __future__ import annotations

import re

import pytest

from cyberdesk_proto.v1 import instance_pb2
from instance_svc.validation import InvalidRequest, MachineLimits, check_egress, validate_create


def test_entries_are_normalised_and_deduplicated() -> None:
    allow, deny = check_egress(
        ["PyPI.org.", "pypi.org", "*.Example.COM", "198.18.71.2", "2001:DB8::/32", "203.0.113.0/24"], ["1.2.3.4"]
    )
    assert allow == ("pypi.org", "*.example.com", "198.18.71.2", "2001:db8::/32", "203.0.113.0/24")
    assert deny == ("1.2.3.4",)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("10.0.0.1/8", "'10.0.0.1/8' is not a valid CIDR or address (10.0.0.1/8 has host bits set)"),
        ("300.1.1.1", "'300.1.1.1' is not a valid CIDR or address"),
        ("1.2.3", "'1.2.3' is not a valid CIDR"),
        ("localhost", "'localhost' is neither a CIDR, an address nor a host name"),
        ("x.*.com", "'x.*.com' is neither"),
        ("*", "'*' is neither"),
        ("-bad.com", "'-bad.com' is neither"),
        ("a..b", "'a..b' is neither"),
        ("", "'' is neither"),
        ("a" * 64 + ".com", "is neither"),
    ],
)
def test_a_bad_entry_is_named(entry: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=r"^egress\.deny: ") as err:
        check_egress([], [entry])
    assert message in str(err.value)


def test_too_many_entries() -> None:
    with pytest.raises(InvalidRequest, match=re.escape("egress.allow: at most 64 entries, got 65")):
        check_egress([f"198.18.0.{i}" for i in range(65)], [])


def test_create_carries_the_policy_and_checks_it_without_internet_too() -> None:
    request = instance_pb2.CreateInstanceRequest(
        network=instance_pb2.NETWORK_MODE_INTERNET, egress=instance_pb2.EgressPolicy(allow=["pypi.org"], deny=["::1"])
    )
    spec = validate_create(request, MachineLimits())
    assert spec.internet and spec.egress_allow == ("pypi.org",) and spec.egress_deny == ("::1",)
    with pytest.raises(InvalidRequest, match=re.escape("egress.allow: 'bad host' is neither")):
        validate_create(
            instance_pb2.CreateInstanceRequest(egress=instance_pb2.EgressPolicy(allow=["bad host"])), MachineLimits()
        )
