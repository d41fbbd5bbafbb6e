"""The resolver of an INTERNET sandbox whose egress policy names hosts: it teaches the nft rules the addresses.

Rules made of addresses cannot follow names: `*.example.com` has no address list, and a name's
addresses change. So a sandbox whose policy has host names resolves through this small DNS
forwarder. It listens on 127.0.0.53:53 in the sandbox's own network namespace (UDP and TCP), and
forwards each query to the upstream resolver (slirp's 10.0.2.3 by default). Before it answers,
it puts every A/AAAA address of the answer into the ruleset's `dyn_allow_*` set when the question
matches the allow list, with the answer's TTL (at least 60 s). A question that matches the deny
list is answered REFUSED and forwarded nowhere. The tenant cannot go around it: only packets
carrying this process's socket mark may reach the upstream's port 53 (network.py), and setting a
mark needs CAP_NET_ADMIN, which the tenant lacks.

It runs as the sandbox uid on the host, inside the sandbox's network namespace (nsenter, then
setpriv). That uid owns the sandbox's user namespace, so it may bind port 53 there, mark its
sockets and update the sandbox's nft sets, and nothing more. It exits when the sandbox's PID 1
does (a pidfd). Standard library only: network.py runs it with the host's /usr/bin/python3 and
this file's text as `-c`, so the sandbox uid needs no access to instance_svc's interpreter or
checkout, and none of instance_svc is loaded.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import struct
import subprocess
import sys
import threading

LISTEN = "127.0.0.53"
_MIN_TTL = 60
_MAX_TTL = 86_400
_REFUSED = 5
_TYPE_A, _TYPE_AAAA = 1, 28
# Queries (and TCP connections) answered at once; more are dropped until one finishes.
_IN_FLIGHT = 64


def matches(name: str, patterns: list[str]) -> bool:
    """Whether `name` is one of the patterns: an exact host name, or a subdomain of a `*.` pattern."""
    name = name.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]):
                return True
        elif name == pattern:
            return True
    return False


def _name(data: bytes, offset: int) -> tuple[str, int]:
    """A (possibly compressed) domain name at `offset`; returns it and the offset after it."""
    labels: list[str] = []
    end = -1
    for _ in range(128):  # a bound on pointer chains: a loop in a hostile answer ends here
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if end < 0:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            continue
        if length == 0:
            return ".".join(labels), (end if end >= 0 else offset + 1)
        labels.append(data[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    raise ValueError("name too long or looping")


def question(query: bytes) -> str:
    """The first question's name of a DNS message ("" when it has none or cannot be read)."""
    try:
        (qdcount,) = struct.unpack_from("!H", query, 4)
        return _name(query, 12)[0].lower() if qdcount else ""
    except (IndexError, ValueError, struct.error):
        return ""


def addresses(answer: bytes) -> list[tuple[int, str, int]]:
    """(family, address, ttl) of every A and AAAA record in the answer section."""
    found: list[tuple[int, str, int]] = []
    try:
        qdcount, ancount = struct.unpack_from("!HH", answer, 4)
        offset = 12
        for _ in range(qdcount):
            offset = _name(answer, offset)[1] + 4
        for _ in range(ancount):
            offset = _name(answer, offset)[1]
            rtype, _cls, ttl, rdlen = struct.unpack_from("!HHIH", answer, offset)
            offset += 10
            rdata = answer[offset : offset + rdlen]
            offset += rdlen
            if rtype == _TYPE_A and rdlen == 4:
                found.append((socket.AF_INET, socket.inet_ntop(socket.AF_INET, rdata), ttl))
            elif rtype == _TYPE_AAAA and rdlen == 16:
                found.append((socket.AF_INET6, socket.inet_ntop(socket.AF_INET6, rdata), ttl))
    except (IndexError, ValueError, struct.error):
        pass  # what was read before the damage still counts; the client gets the answer as it is
    return found


def refused(query: bytes) -> bytes:
    """A REFUSED answer to `query` (same id and question)."""
    if len(query) < 12:
        return b""
    ident, flags = struct.unpack_from("!HH", query, 0)
    rd = flags & 0x0100
    header = struct.pack("!HHHHHH", ident, 0x8000 | rd | 0x0080 | _REFUSED, 1, 0, 0, 0)
    try:
        end = _name(query, 12)[1] + 4
    except (IndexError, ValueError):
        return header[:4] + b"\0\0\0\0\0\0\0\0"
    return header + query[12:end]


class Guard:
    """One sandbox's resolver: forward, learn, answer."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.upstream = args.upstream
        self.mark = args.mark
        self.table = args.table
        self.allow = args.allow
        self.deny = args.deny
        self._nft_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(_IN_FLIGHT)

    def _learn(self, answer: bytes) -> None:
        lines = []
        for family, addr, ttl in addresses(answer):
            target = f"inet {self.table} dyn_allow_{'v4' if family == socket.AF_INET else 'v6'}"
            timeout = min(max(ttl, _MIN_TTL), _MAX_TTL)
            # add, delete, add in one transaction: a known address gets its timeout renewed.
            lines += [
                f"add element {target} {{ {addr} timeout {timeout}s }}",
                f"delete element {target} {{ {addr} }}",
                f"add element {target} {{ {addr} timeout {timeout}s }}",
            ]
        if not lines:
            return
        with self._nft_lock:
            subprocess.run(
                ["nft", "-f", "-"],
                input="\n".join(lines) + "\n",
                text=True,
                capture_output=True,
                timeout=10,
                check=False,
            )

    def answer(self, query: bytes, over_tcp: bool) -> bytes:
        """The reply to one query (learning its addresses first when the allow list names it)."""
        name = question(query)
        if not name or matches(name, self.deny):
            return refused(query)
        reply = self._forward_tcp(query) if over_tcp else self._forward_udp(query)
        if reply and self.allow and matches(name, self.allow):
            self._learn(reply)
        return reply

    def _socket(self, kind: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
        sock.settimeout(5)
        return sock

    def _forward_udp(self, query: bytes) -> bytes:
        with self._socket(socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(query, (self.upstream, 53))
                while True:
                    reply, _ = sock.recvfrom(65535)
                    if reply[:2] == query[:2]:
                        return reply
            except OSError:
                return b""

    def _forward_tcp(self, query: bytes) -> bytes:
        with self._socket(socket.SOCK_STREAM) as sock:
            try:
                sock.connect((self.upstream, 53))
                sock.sendall(struct.pack("!H", len(query)) + query)
                return _read_framed(sock)
            except OSError:
                return b""

    def serve_udp(self, sock: socket.socket) -> None:
        """Answer each datagram in a thread of its own (a slow upstream must not hold the others).

        At most `_IN_FLIGHT` at once: beyond that a datagram is dropped (the client retries), so a
        tenant flooding its resolver gets slower DNS, not a process with unbounded threads.
        """
        while True:
            query, peer = sock.recvfrom(65535)
            if not self._slots.acquire(blocking=False):
                continue

            def reply(q: bytes = query, p: tuple[str, int] = peer) -> None:
                try:
                    out = self.answer(q, over_tcp=False)
                    if out:
                        sock.sendto(out, p)
                finally:
                    self._slots.release()

            threading.Thread(target=reply, daemon=True).start()

    def serve_tcp(self, sock: socket.socket) -> None:
        """Answer length-framed queries on each connection (clients retry truncated answers over TCP)."""
        while True:
            conn, _ = sock.accept()
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue

            def talk(c: socket.socket = conn) -> None:
                with c:
                    c.settimeout(10)
                    try:
                        while query := _read_framed(c):
                            out = self.answer(query, over_tcp=True)
                            c.sendall(struct.pack("!H", len(out)) + out)
                    except OSError:
                        pass
                    finally:
                        self._slots.release()

            threading.Thread(target=talk, daemon=True).start()


def _read_framed(sock: socket.socket) -> bytes:
    """One length-prefixed DNS message from a TCP stream (b"" at its end)."""

    def exactly(count: int) -> bytes:
        buf = b""
        while len(buf) < count:
            chunk = sock.recv(count - len(buf))
            if not chunk:
                return b""
            buf += chunk
        return buf

    head = exactly(2)
    return exactly(struct.unpack("!H", head)[0]) if head else b""


def main() -> None:
    """Bind, say ready on fd `--ready-fd`, serve until the sandbox's PID 1 ends."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--init-pid", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--mark", type=lambda v: int(v, 0), required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--allow", action="append", default=[])
    parser.add_argument("--deny", action="append", default=[])
    args = parser.parse_args()
    pidfd = os.pidfd_open(args.init_pid)
    guard = Guard(args)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((LISTEN, 53))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((LISTEN, 53))
    tcp.listen(64)
    threading.Thread(target=guard.serve_udp, args=(udp,), daemon=True).start()
    threading.Thread(target=guard.serve_tcp, args=(tcp,), daemon=True).start()
    os.write(args.ready_fd, b"1")
    os.close(args.ready_fd)
    select.select([pidfd], [], [])
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
