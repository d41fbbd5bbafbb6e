"""HTTP request -> protobuf message and protobuf message -> JSON, per the rules of google/api/http.proto."""

from __future__ import annotations

import json
import re
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from cyberdesk_common.status import RpcError
from cyberdesk_proto.v1 import filesystem_pb2, instance_pb2, process_pb2
from gateway_svc.rest import json_mapping as mapping
from gateway_svc.rest.http_bindings import BindingTable


def decode(table: BindingTable, method: str, path: str, query: str = "", body: bytes | None = None) -> Any:
    found = table.match(method, path)
    assert found is not None, f"no binding for {method} {path}"
    return mapping.decode_request(found.binding, found.variables, query, body)


def as_dict(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return out


def bad(table: BindingTable, method: str, path: str, query: str = "", body: bytes | None = None) -> str:
    with pytest.raises(RpcError) as info:
        decode(table, method, path, query, body)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return info.value.message


# (query string, expected fields of the decoded message, proto names, proto3 JSON values)
QUERY_CASES: list[tuple[str, dict[str, Any]]] = [
    ("i32=-7", {"i32": -7}),
    ("i64=9007199254740993", {"i64": "9007199254740993"}),
    ("u32=4294967295", {"u32": 4294967295}),
    ("u64=18446744073709551615", {"u64": "18446744073709551615"}),
    ("s32=-3", {"s32": -3}),
    ("f64=5", {"f64": "5"}),
    ("dbl=1.5e3", {"dbl": 1500.0}),
    ("flt=0.25", {"flt": 0.25}),
    ("dbl=NaN", {"dbl": "NaN"}),
    ("dbl=-Infinity", {"dbl": "-Infinity"}),
    ("flag=true", {"flag": True}),
    ("flag=1", {"flag": True}),
    ("flag=FALSE&i32=1", {"i32": 1}),
    ("data=aGk%2Fbw%3D%3D", {"data": "aGk/bw=="}),  # standard alphabet, padded
    ("data=aGk_bw", {"data": "aGk/bw=="}),  # URL-safe, unpadded
    ("color=COLOR_BLUE", {"color": "COLOR_BLUE"}),
    ("color=1", {"color": "COLOR_RED"}),
    ("colors=COLOR_RED&colors=2&colors=COLOR_RED", {"colors": ["COLOR_RED", "COLOR_BLUE", "COLOR_RED"]}),
    ("tags=a&tags=b+c&tags=d%26e", {"tags": ["a", "b c", "d&e"]}),
    ("when=2024-05-01T12:00:00.5Z", {"when": "2024-05-01T12:00:00.500Z"}),
    ("when=2024-05-01T14:00:00%2B02:00", {"when": "2024-05-01T12:00:00Z"}),
    ("timeout=1.5s", {"timeout": "1.500s"}),
    ("timeout=-3s", {"timeout": "-3s"}),
    ("mask=inner.name,opt_i64", {"mask": "inner.name,optI64"}),
    ("mask=inner.name,optI64", {"mask": "inner.name,optI64"}),
    ("opt_i64=0", {"opt_i64": "0"}),  # a wrapper keeps an explicit zero
    ("opt_str=", {"opt_str": ""}),
    ("opt_bool=false", {"opt_bool": False}),
    ("inner.name=n&inner.depth=2", {"inner": {"name": "n", "depth": 2}}),
    ("inner.leaf.flag=true", {"inner": {"leaf": {"flag": True}}}),
    ("innerName=x", None),  # placeholder replaced below: camel names at the top level only
    ("labels%5Bteam%5D=ml&labels[env]=prod", {"labels": {"team": "ml", "env": "prod"}}),
    ("by_number[7]=seven", {"by_number": {7: "seven"}}),
    ("pickA=x", {"pick_a": "x"}),
    ("pick_b=4", {"pick_b": 4}),
    ("optI64=5&optStr=s", {"opt_i64": "5", "opt_str": "s"}),  # lowerCamelCase accepted
]
QUERY_CASES = [c for c in QUERY_CASES if c[1] is not None]


@pytest.mark.parametrize(("query", "expected"), QUERY_CASES)
def test_query_parameter_types(test_table: BindingTable, query: str, expected: dict[str, Any]) -> None:
    msg = decode(test_table, "GET", "/t/things/x1", query)
    got = as_dict(msg)
    assert got.pop("id") == "x1"
    if "by_number" in expected:
        assert dict(msg.by_number) == expected["by_number"]
        return
    assert got == expected


BAD_QUERIES: list[tuple[str, str]] = [
    ("nope=1", "unknown field 'nope'"),
    ("inner.nope=1", "unknown field 'nope' in inner"),
    ("i32=abc", "query parameter i32: 'abc' is not an integer"),
    ("i32=2147483648", "out of range"),
    ("u32=-1", "out of range"),
    ("dbl=1.2.3", "is not a number"),
    ("flag=yes", "is not a boolean"),
    ("data=%%%", "is not base64"),
    ("color=COLOR_GREEN", "is not a value of cyberdesk.transcodetest.Color"),
    ("color=9", "is not a value of"),
    ("when=yesterday", "is not an RFC 3339 time"),
    ("timeout=5", 'is not a duration like "1.5s"'),
    ("i32=1&i32=2", "given 2 times but it is not repeated"),
    ("inner=x", "a message; set its fields"),
    ("inners.name=x", "inners has no sub-fields"),
    ("labels=x", "a map; write it as"),
    ("tags[0]=x", "not a map"),
    ("by_number[x]=y", "key: 'x' is not an integer"),
    ("pick_a=x&pick_b=1", "are alternatives (oneof choice)"),
    ("id=other", "id is already given in the path"),
    ("a-b=1", "not a field path"),
]


@pytest.mark.parametrize(("query", "message"), BAD_QUERIES)
def test_bad_query_parameters_name_the_field(test_table: BindingTable, query: str, message: str) -> None:
    assert message in bad(test_table, "GET", "/t/things/x1", query)


def test_nested_path_variable_and_additional_binding(test_table: BindingTable) -> None:
    msg = decode(test_table, "GET", "/t/inner/deep%20name/things/7", "inner.depth=3")
    assert as_dict(msg) == {"id": "7", "inner": {"name": "deep name", "depth": 3}}
    with pytest.raises(RpcError, match=re.escape("inner.name is already given in the path")):
        decode(test_table, "GET", "/t/inner/a/things/7", "inner.name=b")
    with pytest.raises(RpcError, match=re.escape("inner.name is already given in the path")):
        decode(test_table, "GET", "/t/inner/a/things/7", "inner=b")


def test_path_variable_types_are_converted(test_table: BindingTable) -> None:
    assert decode(test_table, "REPORT", "/t/watch/true").inner.leaf.flag is True
    with pytest.raises(RpcError, match=re.escape("path variable inner.leaf.flag: 'maybe' is not a boolean")):
        decode(test_table, "REPORT", "/t/watch/maybe")


def test_multi_segment_variable_keeps_encoded_slash(test_table: BindingTable) -> None:
    assert decode(test_table, "GET", "/t/files/a/b%2Fc/d%20e").id == "a/b%2Fc/d e"


def test_body_star(test_table: BindingTable) -> None:
    body = json.dumps({"i64": "12", "innerName": None, "inner": {"name": "n"}, "optI64": 0, "color": 2}).replace(
        '"innerName": null, ', ""
    )
    msg = decode(test_table, "POST", "/t/things/x:touch", body=body.encode())
    assert as_dict(msg) == {"id": "x", "i64": "12", "inner": {"name": "n"}, "opt_i64": "0", "color": "COLOR_BLUE"}
    # Proto names work as well as JSON names; an empty body is an empty message.
    assert decode(test_table, "POST", "/t/things/x:touch", body=b'{"opt_i64": "3"}').opt_i64.value == 3
    assert as_dict(decode(test_table, "POST", "/t/things/x:touch", body=b"")) == {"id": "x"}
    # The same id in the body and the path is fine; a different one is refused.
    assert decode(test_table, "POST", "/t/things/x:touch", body=b'{"id": "x"}').id == "x"
    message = bad(test_table, "POST", "/t/things/x:touch", body=b'{"id": "y"}')
    assert "the path says 'x' but the body says 'y'" in message


BAD_BODIES: list[tuple[bytes, str]] = [
    (b"{", "request body is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    (b"[1]", "request body must be a JSON object, not list"),
    (b'{"nope": 1}', "request body: unknown field nope"),
    (b'{"inner": {"nope": 1}}', "request body: unknown field inner.nope"),
    (b'{"i32": "x"}', "i32"),
    (b'{"color": "COLOR_GREEN"}', "COLOR_GREEN"),
    (b'{"timeout": "5"}', "timeout"),
    (b'{"data": "a"}', "data"),
    (b"\xff\xfe", "request body is not UTF-8"),
]


@pytest.mark.parametrize(("body", "message"), BAD_BODIES)
def test_bad_bodies_name_the_problem(test_table: BindingTable, body: bytes, message: str) -> None:
    assert message in bad(test_table, "POST", "/t/things/x:touch", body=body)


def test_query_is_refused_when_body_is_star(test_table: BindingTable) -> None:
    assert "takes the whole request in the body" in bad(test_table, "POST", "/t/things/x:touch", "i32=1")


def test_body_field(test_table: BindingTable) -> None:
    msg = decode(test_table, "PUT", "/t/things/x/inner", "i32=4", b'{"name": "n", "leaf": {"flag": true}}')
    assert as_dict(msg) == {"id": "x", "i32": 4, "inner": {"name": "n", "leaf": {"flag": True}}}
    tags = decode(test_table, "POST", "/t/things/x/tags", body=b'["a", "b"]')
    assert list(tags.tags) == ["a", "b"]
    assert "unknown field inner.nope" in bad(test_table, "PUT", "/t/things/x/inner", body=b'{"nope": 1}')
    assert "inner is carried by the request body" in bad(test_table, "PUT", "/t/things/x/inner", "inner.name=y")
    assert "tags" in bad(test_table, "POST", "/t/things/x/tags", body=b'"a"')


def test_no_body_route_refuses_a_body(test_table: BindingTable) -> None:
    assert "takes no request body" in bad(test_table, "GET", "/t/things/x", body=b'{"i32": 1}')
    assert decode(test_table, "GET", "/t/things/x", body=b"  ").id == "x"


def test_query_as_pairs_and_bad_utf8(test_table: BindingTable) -> None:
    found = test_table.match("GET", "/t/things/x")
    assert found is not None
    msg = mapping.decode_request(found.binding, found.variables, [("tags", "a"), ("tags", "b")])
    assert list(msg.tags) == ["a", "b"]
    assert "not UTF-8" in bad(test_table, "GET", "/t/things/x", "tags=%ff")


def test_response_mapping(test_table: BindingTable) -> None:
    reply_cls = test_table.for_method("cyberdesk.transcodetest.TestService.Get")[0].response_class()
    reply = reply_cls()
    json_format.ParseDict({"item": {"id": "a", "i64": "5", "data": "aGk=", "optI64": "0"}, "names": ["n"]}, reply)
    get = test_table.for_method("cyberdesk.transcodetest.TestService.Get")[0]
    out = mapping.encode_response(get, reply)
    assert out["total"] == "0"  # int64 as a string; defaults printed
    assert out["names"] == ["n"]
    item = out["item"]
    assert item["i64"] == "5" and item["data"] == "aGk=" and item["optI64"] == "0"
    assert item["color"] == "COLOR_UNSPECIFIED" and item["flag"] is False  # enums by name
    assert "when" not in item and "inner" not in item  # messages without a value stay absent
    assert "pickA" not in item  # an unset oneof member stays absent
    put_inner = test_table.for_method("cyberdesk.transcodetest.TestService.PutInner")[0]
    assert mapping.encode_response(put_inner, reply)["id"] == "a"  # response_body: "item"
    put_tags = test_table.for_method("cyberdesk.transcodetest.TestService.PutTags")[0]
    assert mapping.encode_response(put_tags, reply) == ["n"]
    total = test_table.for_method("cyberdesk.transcodetest.TestService.Total")[0]
    assert mapping.encode_response(total, reply) == "0"
    assert mapping.encode_response(put_inner, reply_cls()) == mapping.encode_response(put_inner, reply_cls())


def test_stream_framing(test_table: BindingTable) -> None:
    binding = test_table.for_method("cyberdesk.transcodetest.TestService.Watch")[0]
    assert binding.server_streaming and not binding.client_streaming
    reply = binding.response_class()(names=["a\nb"])
    item = mapping.stream_result(binding, reply)
    line = mapping.ndjson_line(item)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["result"]["names"] == ["a\nb"]
    event = mapping.sse_event(item, "result")
    assert event.startswith(b"event: result\ndata: {") and event.endswith(b"\n\n") and event.count(b"\n") == 3


# --- cyberdesk.v1 bindings -------------------------------------------------------------------------


def test_create_instance(api_table: BindingTable) -> None:
    body = b'{"template": "desktop", "memory_mib": 1024, "timeout": "600s", "timeoutAction": "TIMEOUT_ACTION_PAUSE"}'
    msg = decode(api_table, "POST", "/v1/instances", body=body)
    assert isinstance(msg, instance_pb2.CreateInstanceRequest)
    assert (msg.template, msg.memory_mib, msg.timeout.seconds, msg.timeout_action) == ("desktop", 1024, 600, 2)


def test_list_instances_query(api_table: BindingTable) -> None:
    msg = decode(api_table, "GET", "/v1/instances", "pageSize=10&states=INSTANCE_STATE_RUNNING&states=4&labels[a]=b")
    assert isinstance(msg, instance_pb2.ListInstancesRequest)
    assert msg.page_size == 10 and list(msg.states) == [3, 4] and dict(msg.labels) == {"a": "b"}


def test_list_snapshots_additional_binding(api_table: BindingTable) -> None:
    a = decode(api_table, "GET", "/v1/snapshots", "instance_id=i-1&page_size=5")
    b = decode(api_table, "GET", "/v1/instances/i-1/snapshots", "page_size=5")
    assert a == b == instance_pb2.ListSnapshotsRequest(instance_id="i-1", page_size=5)


def test_set_timeout_verb(api_table: BindingTable) -> None:
    msg = decode(api_table, "POST", "/v1/instances/i-9:setTimeout", body=b'{"timeout": "30s"}')
    assert msg == instance_pb2.SetInstanceTimeoutRequest(instance_id="i-9", timeout={"seconds": 30})


def test_process_selector_by_pid_or_tag(api_table: BindingTable) -> None:
    by_pid = decode(api_table, "POST", "/v1/instances/i/processes/42:signal", body=b'{"signal": "SIGNAL_SIGTERM"}')
    assert by_pid == process_pb2.SendProcessSignalRequest(instance_id="i", selector={"pid": 42}, signal=15)
    by_tag = decode(api_table, "POST", "/v1/instances/i/processes/tags/web%20srv:signal", body=b'{"signal": 9}')
    assert by_tag == process_pb2.SendProcessSignalRequest(instance_id="i", selector={"tag": "web srv"}, signal=9)
    assert "'x' is not an integer" in bad(api_table, "POST", "/v1/instances/i/processes/x:signal", body=b"{}")
    # The oneof in the path cannot be contradicted by the body.
    msg = bad(api_table, "POST", "/v1/instances/i/processes/42:signal", body=b'{"selector": {"tag": "t"}}')
    assert "alternatives (oneof selector)" in msg


def test_file_download_path_is_absolute(api_table: BindingTable) -> None:
    found = api_table.match("GET", "/v1/instances/i-1/files/etc/my%20dir/a%2Fb.txt")
    assert found is not None and found.binding.raw_response_field == "chunk"
    msg = mapping.decode_request(found.binding, found.variables, "offset=10&length=5")
    assert msg == filesystem_pb2.DownloadFileRequest(
        instance_id="i-1", path="/etc/my dir/a%2Fb.txt", offset=10, length=5
    )


def test_file_upload_header_and_chunks(api_table: BindingTable) -> None:
    found = api_table.match("PUT", "/v1/instances/i-1/files/tmp/x.bin")
    assert found is not None
    binding = found.binding
    assert binding.client_streaming and binding.raw_request_field == "chunk"
    first = mapping.decode_request(binding, found.variables, "header.overwrite=true&header.mode=420")
    assert first == filesystem_pb2.UploadFileRequest(
        instance_id="i-1", header={"path": "/tmp/x.bin", "overwrite": True, "mode": 420}
    )
    assert mapping.chunk_message(binding, b"\x00\x01") == filesystem_pb2.UploadFileRequest(chunk=b"\x00\x01")


def test_pty_is_a_websocket_route(api_table: BindingTable) -> None:
    found = api_table.match("GET", "/v1/instances/i-1/pty")
    assert found is not None and found.binding.websocket


def test_nd_json_input_stream_messages(api_table: BindingTable) -> None:
    (binding,) = api_table.for_method("cyberdesk.v1.ProcessService.StreamProcessInput")
    msg = mapping.message_from_json(binding.request_class(), b'{"data": "aGk="}', "line 2")
    assert msg == process_pb2.StreamProcessInputRequest(data=b"hi")
    with pytest.raises(RpcError, match="line 2: unknown field bogus"):
        mapping.message_from_json(binding.request_class(), b'{"bogus": 1}', "line 2")
