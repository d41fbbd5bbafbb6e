"""Validation of a CreateInstanceRequest into a plain spec (pure: no I/O, no clock)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from cyberdesk_proto.v1 import instance_pb2
from instance_svc.expiry import DEFAULT_TIMEOUT_US, US, TimeoutAction, check_timeout

TEMPLATES = ("base", "desktop")
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# An idempotency key (AIP-155): a UUID fits, as do the SDKs' and most clients' own keys. Kept to
# a safe alphabet so that it can be logged and shown as it is.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
MAX_LABELS = 64
# One DNS label (RFC 1123): letters, digits, inner hyphens, at most 63 characters.
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
MAX_EGRESS_ENTRIES = 64
MAX_ENV = 256
MAX_ENV_VALUE = 32 * 1024
DEFAULT_SCREEN = (1280, 800)
# Disk of each template's writable layer when the request names none: the desktop's X server, its
# fonts cache and a browser profile want more room than a shell does.
TEMPLATE_DISK_MIB = {"base": 2048, "desktop": 4096}
# Below this mkfs still works, but /etc's copies and a pip install or two would not fit.
MIN_DISK_MIB = 256


class InvalidRequest(ValueError):
    """The request is malformed; the message names the field and what is allowed."""


@dataclass(frozen=True)
class MachineLimits:
    """The largest instance this deployment offers."""

    max_vcpus: int = 8
    max_memory_mib: int = 16384
    max_disk_mib: int = 65536


@dataclass(frozen=True)
class CreateSpec:
    """A validated create request."""

    template: str
    vcpus: int
    memory_mib: int
    timeout_us: int
    timeout_action: TimeoutAction
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    desktop: tuple[int, int] | None = None
    internet: bool = False
    snapshot_id: str = ""
    disk_mib: int = TEMPLATE_DISK_MIB["base"]
    # Whether disk_mib came from the request (a restore otherwise takes its snapshot's size).
    disk_mib_requested: bool = False
    request_id: str = ""
    egress_allow: tuple[str, ...] = ()
    egress_deny: tuple[str, ...] = ()


def _egress_entry(entry: str, field_name: str) -> str:
    """The entry normalised (a CIDR in its canonical form, a host name in lowercase), or InvalidRequest."""
    if "/" in entry or ":" in entry or entry.replace(".", "").isdigit():
        try:
            if "/" not in entry:
                return str(ipaddress.ip_address(entry))
            return str(ipaddress.ip_network(entry, strict=True))
        except ValueError as err:
            raise InvalidRequest(f"{field_name}: {entry!r} is not a valid CIDR or address ({err})") from None
    name = entry.lower().rstrip(".")
    labels = name.removeprefix("*.").split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_DNS_LABEL.match(label) for label in labels):
        raise InvalidRequest(
            f"{field_name}: {entry!r} is neither a CIDR, an address nor a host name "
            "(like pypi.org, or *.example.com for its subdomains)"
        )
    return name


def check_egress(allow: Sequence[str], deny: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The egress lists normalised and without duplicates, or InvalidRequest naming the first bad entry."""
    lists = []
    for field_name, entries in (("egress.allow", allow), ("egress.deny", deny)):
        if len(entries) > MAX_EGRESS_ENTRIES:
            raise InvalidRequest(f"{field_name}: at most {MAX_EGRESS_ENTRIES} entries, got {len(entries)}")
        lists.append(tuple(dict.fromkeys(_egress_entry(e, field_name) for e in entries)))
    return lists[0], lists[1]


def check_labels(labels: dict[str, str], field_name: str = "labels") -> None:
    """Raise InvalidRequest unless every key and value is a sane label."""
    if len(labels) > MAX_LABELS:
        raise InvalidRequest(f"{field_name}: at most {MAX_LABELS} labels, got {len(labels)}")
    for key, value in labels.items():
        if not _LABEL_KEY.match(key):
            raise InvalidRequest(
                f"{field_name}: key {key!r} must start with a lowercase letter and hold at most 63 of a-z 0-9 _ . -"
            )
        if not _LABEL_VALUE.match(value):
            raise InvalidRequest(f"{field_name}[{key}]: value {value!r} must hold at most 63 of A-Z a-z 0-9 _ . -")


def validate_create(request: instance_pb2.CreateInstanceRequest, limits: MachineLimits) -> CreateSpec:
    """A CreateSpec with defaults applied, or InvalidRequest naming the first bad field."""
    template = request.template or "base"
    if template not in TEMPLATES:
        raise InvalidRequest(f"template {template!r} is unknown; use one of {', '.join(TEMPLATES)}")
    vcpus = request.vcpus or 1
    if not 1 <= vcpus <= limits.max_vcpus:
        raise InvalidRequest(f"vcpus must be between 1 and {limits.max_vcpus}, got {vcpus}")
    memory = request.memory_mib or 512
    if not 128 <= memory <= limits.max_memory_mib:
        raise InvalidRequest(f"memory_mib must be between 128 and {limits.max_memory_mib}, got {memory}")
    disk = request.disk_mib or TEMPLATE_DISK_MIB[template]
    if not MIN_DISK_MIB <= disk <= limits.max_disk_mib:
        raise InvalidRequest(f"disk_mib must be between {MIN_DISK_MIB} and {limits.max_disk_mib}, got {disk}")
    timeout_us = DEFAULT_TIMEOUT_US
    if request.HasField("timeout"):
        timeout_us = request.timeout.seconds * US + request.timeout.nanos // 1000
        problem = check_timeout(timeout_us)
        if problem:
            raise InvalidRequest(problem)
    try:
        action = TimeoutAction(request.timeout_action or TimeoutAction.TERMINATE.value)
    except ValueError:
        raise InvalidRequest(f"timeout_action {request.timeout_action} is unknown; use TERMINATE or PAUSE") from None
    env = dict(request.env)
    if len(env) > MAX_ENV:
        raise InvalidRequest(f"env: at most {MAX_ENV} variables, got {len(env)}")
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise InvalidRequest(f"env: {name!r} is not a valid variable name (letters, digits, _; not first a digit)")
        if name.upper().startswith("CYBERDESK_"):
            raise InvalidRequest(f"env: {name} is reserved (names starting with CYBERDESK_ belong to the platform)")
        if "\0" in value or len(value) > MAX_ENV_VALUE:
            raise InvalidRequest(f"env[{name}]: value must hold no NUL byte and at most {MAX_ENV_VALUE} characters")
    labels = dict(request.labels)
    check_labels(labels)
    desktop: tuple[int, int] | None = None
    if template == "desktop" or request.desktop.enabled:
        width = request.desktop.width or DEFAULT_SCREEN[0]
        height = request.desktop.height or DEFAULT_SCREEN[1]
        if not (320 <= width <= 7680 and 240 <= height <= 4320):
            raise InvalidRequest(f"desktop: screen {width}x{height} must be within 320x240 and 7680x4320")
        desktop = (width, height)
    if request.network not in (
        instance_pb2.NETWORK_MODE_UNSPECIFIED,
        instance_pb2.NETWORK_MODE_NONE,
        instance_pb2.NETWORK_MODE_INTERNET,
    ):
        raise InvalidRequest(f"network {request.network} is unknown; use NONE or INTERNET")
    if request.request_id and not _REQUEST_ID.match(request.request_id):
        raise InvalidRequest(
            "request_id must be 1 to 128 letters, digits, '-' or '_' (a UUID, for example); "
            f"got {len(request.request_id)} characters"
        )
    # Checked even without INTERNET (where it has no effect): a bad entry is a mistake either way.
    egress_allow, egress_deny = check_egress(request.egress.allow, request.egress.deny)
    return CreateSpec(
        template=template,
        vcpus=vcpus,
        memory_mib=memory,
        timeout_us=timeout_us,
        timeout_action=action,
        env=env,
        labels=labels,
        desktop=desktop,
        internet=request.network == instance_pb2.NETWORK_MODE_INTERNET,
        snapshot_id=request.snapshot_id,
        request_id=request.request_id,
        disk_mib=disk,
        disk_mib_requested=request.disk_mib != 0,
        egress_allow=egress_allow,
        egress_deny=egress_deny,
    )
