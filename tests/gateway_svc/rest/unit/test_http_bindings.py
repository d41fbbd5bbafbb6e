"""The binding table built from the google.api.http options of cyberdesk.v1 and its start-up checks."""

from __future__ import annotations

import re

import pytest
from google.protobuf.descriptor import ServiceDescriptor

from gateway_svc.rest.http_bindings import BindingTable, build_binding_table
from gateway_svc.rest.path_templates import PathDecodeError


def _rpcs(services: list[ServiceDescriptor]) -> set[str]:
    return {f"{s.full_name}.{m.name}" for s in services for m in s.methods}


# The one RPC the REST face does not serve (auth.proto says why).
GRPC_ONLY = {"cyberdesk.internal.v1.AuthService.VerifyKey"}


def test_every_rpc_of_cyberdesk_v1_has_a_route(api_table: BindingTable) -> None:
    # instance, process, filesystem, desktop, preview, billing, desktop viewer; operators' auth
    assert len(api_table.services) == 8
    assert {r.qualified_name for r in api_table.bindings} == _rpcs(api_table.services) - GRPC_ONLY


def test_additional_bindings_become_routes(api_table: BindingTable) -> None:
    bindings = api_table.for_method("cyberdesk.v1.InstanceService.ListSnapshots")
    assert [(r.binding_index, str(r.template)) for r in bindings] == [
        (0, "/v1/snapshots"),
        (1, "/v1/instances/{instance_id}/snapshots"),
    ]


def test_streaming_flags(api_table: BindingTable) -> None:
    def flags(name: str) -> tuple[bool, bool]:
        r = api_table.for_method(name)[0]
        return r.client_streaming, r.server_streaming

    assert flags("cyberdesk.v1.ProcessService.StartProcess") == (False, True)
    assert flags("cyberdesk.v1.ProcessService.StreamProcessInput") == (True, False)
    assert flags("cyberdesk.v1.ProcessService.ConnectPty") == (True, True)
    assert flags("cyberdesk.v1.FilesystemService.UploadFile") == (True, False)
    assert flags("cyberdesk.v1.InstanceService.GetInstance") == (False, False)


@pytest.mark.parametrize(
    ("method", "path", "rpc", "variables"),
    [
        ("POST", "/v1/instances", "CreateInstance", {}),
        ("GET", "/v1/instances", "ListInstances", {}),
        ("GET", "/v1/instances:watch", "WatchInstances", {}),
        ("GET", "/v1/instances/i-1", "GetInstance", {"instance_id": "i-1"}),
        ("HEAD", "/v1/instances/i-1", "GetInstance", {"instance_id": "i-1"}),
        ("POST", "/v1/instances/i-1:pause", "PauseInstance", {"instance_id": "i-1"}),
        ("GET", "/v1/instances/i-1/desktop", "GetDisplayInfo", {"instance_id": "i-1"}),
        ("GET", "/v1/instances/i-1/desktop/cursor", "GetCursorPosition", {"instance_id": "i-1"}),
        ("GET", "/v1/instances/i-1/fs:stat", "StatPath", {"instance_id": "i-1"}),
        ("GET", "/v1/instances/i-1/files/a/b", "DownloadFile", {"instance_id": "i-1", "path": "a/b"}),
        ("PUT", "/v1/instances/i-1/files/a/b", "UploadFile", {"instance_id": "i-1", "header.path": "a/b"}),
        (
            "POST",
            "/v1/instances/i-1/processes/tags/web:connect",
            "ConnectProcess",
            {"instance_id": "i-1", "selector.tag": "web"},
        ),
        (
            "POST",
            "/v1/instances/i-1/processes/7:connect",
            "ConnectProcess",
            {"instance_id": "i-1", "selector.pid": "7"},
        ),
    ],
)
def test_api_paths(api_table: BindingTable, method: str, path: str, rpc: str, variables: dict[str, str]) -> None:
    found = api_table.match(method, path)
    assert found is not None
    assert found.binding.method == rpc
    assert found.variables == variables


def test_unknown_paths_and_methods(api_table: BindingTable) -> None:
    assert api_table.match("GET", "/v2/instances") is None
    assert api_table.match("PATCH", "/v1/instances/i-1") is None
    assert api_table.allowed_methods("/v1/instances/i-1") == ["DELETE", "GET"]
    assert api_table.allowed_methods("/nowhere") == []
    with pytest.raises(PathDecodeError):
        api_table.match("GET", "/v1/instances/%zz")


def test_bad_annotations_stop_the_build(test_table: BindingTable) -> None:
    # The test proto's annotations are all valid; each broken variant is checked on a copy.
    from google.api import annotations_pb2, http_pb2
    from google.protobuf import descriptor_pb2, descriptor_pool

    fd = test_table.services[0].file
    proto = descriptor_pb2.FileDescriptorProto()
    fd.CopyToProto(proto)

    cases = [
        (http_pb2.HttpRule(get="/t/{nope}"), "has no field 'nope'"),
        (http_pb2.HttpRule(get="/t/{inner}"), "must be a singular scalar field"),
        (http_pb2.HttpRule(get="/t/{tags}"), "must be a singular scalar field"),
        (http_pb2.HttpRule(get="/t/{id.x}"), "is not a singular message"),
        (http_pb2.HttpRule(post="/t", body="nope"), "body 'nope' is not a field"),
        (http_pb2.HttpRule(get="/t", response_body="nope"), "response_body 'nope' is not a field"),
        (http_pb2.HttpRule(get="t"), "starts with '/'"),
        (http_pb2.HttpRule(), "without a pattern"),
    ]
    for i, (rule, why) in enumerate(cases):
        broken = descriptor_pb2.FileDescriptorProto()
        broken.CopyFrom(proto)
        broken.name = f"cyberdesk/transcodetest/broken{i}.proto"
        broken.package = f"cyberdesk.transcodetest.broken{i}"
        method = broken.service[0].method[0]
        method.options.Extensions[annotations_pb2.http].CopyFrom(rule)
        pool = descriptor_pool.Default()
        pool.AddSerializedFile(broken.SerializeToString())
        with pytest.raises(ValueError, match=why):
            build_binding_table([pool.FindFileByName(broken.name)])


def test_two_rpcs_on_one_route_are_refused(test_table: BindingTable) -> None:
    from google.api import annotations_pb2, http_pb2
    from google.protobuf import descriptor_pb2, descriptor_pool

    proto = descriptor_pb2.FileDescriptorProto()
    test_table.services[0].file.CopyToProto(proto)
    proto.name = "cyberdesk/transcodetest/clash.proto"
    proto.package = "cyberdesk.transcodetest.clash"
    proto.service[0].method[1].options.Extensions[annotations_pb2.http].CopyFrom(
        http_pb2.HttpRule(get="/t/things/{i32}")
    )
    descriptor_pool.Default().AddSerializedFile(proto.SerializeToString())
    with pytest.raises(ValueError, match=re.escape("matches the same paths as '/t/things/{id}'")):
        build_binding_table([descriptor_pool.Default().FindFileByName(proto.name)])
