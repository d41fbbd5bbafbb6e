"""Routing, in-process: the field-1 wire scan and the lifecycle entry the route cache follows."""

from __future__ import annotations

import pytest

from cyberdesk_common.lifecycle_events import InstanceState, LifecycleEvent, MalformedEvent
from cyberdesk_proto.v1 import filesystem_pb2, process_pb2
from gateway_svc.routing import WireError, read_instance_id


def test_read_instance_id_of_real_messages() -> None:
    req = process_pb2.StartProcessRequest(instance_id="i-abc", argv=["echo", "hi"], env={"A": "B"})
    assert read_instance_id(req.SerializeToString()) == "i-abc"
    upload = filesystem_pb2.UploadFileRequest(instance_id="i-ü", chunk=b"x" * 100_000)
    assert read_instance_id(upload.SerializeToString()) == "i-ü"
    assert read_instance_id(process_pb2.StartProcessRequest(argv=["ls"]).SerializeToString()) == ""
    assert read_instance_id(b"") == ""


def test_read_instance_id_skips_every_wire_type_and_takes_the_last_field_1() -> None:
    # field 2 varint (300), field 3 fixed64, field 4 fixed32, field 1 "a", field 1 "bb"
    data = bytes([0x10, 0xAC, 0x02, 0x19]) + b"\0" * 8 + bytes([0x25]) + b"\0" * 4
    data += bytes([0x0A, 1]) + b"a" + bytes([0x0A, 2]) + b"bb"
    assert read_instance_id(data) == "bb"


@pytest.mark.parametrize(
    "data",
    [
        bytes([0x0A, 5]) + b"ab",  # length past the end
        bytes([0x0A]),  # truncated length
        bytes([0x08, 1]),  # field 1 as a varint
        bytes([0x0A, 1, 0xFF]),  # not UTF-8
        bytes([0x0B]),  # group wire type
        bytes([0x10]) + b"\xff" * 11,  # endless varint
    ],
)
def test_read_instance_id_rejects_malformed_bytes(data: bytes) -> None:
    with pytest.raises(WireError):
        read_instance_id(data)


def test_parse_event() -> None:
    # The entry exactly as instance_svc's publisher writes it (LifecycleEvent.fields()) and a
    # Redis client without decode_responses hands it back: bytes keys and values.
    entry = {
        b"event_id": b"9f1c",
        b"tenant": b"t",
        b"instance_id": b"i-1",
        b"old_state": b"RUNNING",
        b"new_state": b"PAUSED",
        b"time_us": b"1700000000000000",
        b"vcpus": b"2",
        b"memory_mib": b"2048",
        b"template": b"base",
        b"state_message": b"paused by the deadline",
    }
    event = LifecycleEvent.from_fields(entry)
    assert (event.instance_id, event.new_state) == ("i-1", InstanceState.PAUSED)
    with pytest.raises(MalformedEvent):
        LifecycleEvent.from_fields({b"kind": b"other"})
