"""dns_guard.py's pure parts: name matching and reading DNS messages, hostile ones included."""

from __future__ import annotations

import socket
import struct

from instance_svc.runtime.local import dns_guard


def _query(name: str, ident: int = 0x1234, qtype: int = 1) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", qtype, 1)


def _answer(query: bytes, records: list[tuple[int, bytes]]) -> bytes:
    header = query[:2] + struct.pack("!HHHHH", 0x8180, 1, len(records), 0, 0)
    body = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", rtype, 1, 30, len(rdata)) + rdata for rtype, rdata in records)
    return header + query[12:] + body


def test_patterns_match_names_and_subdomains_only() -> None:
    assert dns_guard.matches("pypi.org", ["pypi.org"]) and dns_guard.matches("PyPI.org.", ["pypi.org"])
    assert not dns_guard.matches("evilpypi.org", ["pypi.org"]) and not dns_guard.matches("x.pypi.org", ["pypi.org"])
    assert dns_guard.matches("a.b.example.com", ["*.example.com"])
    assert not dns_guard.matches("example.com", ["*.example.com"])
    assert not dns_guard.matches("badexample.com", ["*.example.com"])


def test_question_and_addresses_of_an_answer_with_compression() -> None:
    query = _query("www.example.com")
    assert dns_guard.question(query) == "www.example.com"
    reply = _answer(
        query,
        [
            (1, socket.inet_aton("203.0.113.7")),
            (28, socket.inet_pton(socket.AF_INET6, "2001:db8::7")),
            (5, b"\x03cdn\xc0\x10"),  # a CNAME: skipped
        ],
    )
    assert dns_guard.addresses(reply) == [
        (socket.AF_INET, "203.0.113.7", 30),
        (socket.AF_INET6, "2001:db8::7", 30),
    ]


def test_hostile_messages_yield_nothing_rather_than_an_error() -> None:
    looping = struct.pack("!HHHHHH", 1, 0x8180, 1, 1, 0, 0) + b"\xc0\x0c"  # a pointer to itself
    assert dns_guard.question(looping) == ""
    assert dns_guard.addresses(looping) == []
    assert dns_guard.addresses(b"\x00") == []
    truncated = _answer(_query("a.example.com"), [(1, socket.inet_aton("203.0.113.8"))])[:-2]
    assert dns_guard.addresses(truncated) == []


def test_refused_keeps_id_and_question() -> None:
    query = _query("b.example.com", ident=0xBEEF)
    reply = dns_guard.refused(query)
    ident, flags, qd, an = struct.unpack_from("!HHHH", reply)
    assert (ident, flags & 0x800F, qd, an) == (0xBEEF, 0x8005, 1, 0)
    assert dns_guard.question(reply) == "b.example.com"
