"""A test-only proto with every field kind the transcoder handles, compiled with grpc_tools at import time."""

from __future__ import annotations

import tempfile
from pathlib import Path

import grpc_tools
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, field_mask_pb2, timestamp_pb2, wrappers_pb2
from google.protobuf.descriptor import FileDescriptor
from grpc_tools import protoc

from gateway_svc.rest.http_bindings import BindingTable, build_binding_table

ROOT = Path(__file__).resolve().parents[4]

PROTO = """
syntax = "proto3";
package cyberdesk.transcodetest;

import "google/api/annotations.proto";
import "google/protobuf/duration.proto";
import "google/protobuf/field_mask.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

enum Color {
  COLOR_UNSPECIFIED = 0;
  COLOR_RED = 1;
  COLOR_BLUE = 2;
}

message Inner {
  string name = 1;
  int32 depth = 2;
  Leaf leaf = 3;
}

message Leaf {
  bool flag = 1;
}

message Everything {
  string id = 1;
  int32 i32 = 2;
  int64 i64 = 3;
  uint32 u32 = 4;
  uint64 u64 = 5;
  sint32 s32 = 6;
  double dbl = 7;
  float flt = 8;
  bool flag = 9;
  bytes data = 10;
  Color color = 11;
  repeated Color colors = 12;
  repeated string tags = 13;
  google.protobuf.Timestamp when = 14;
  google.protobuf.Duration timeout = 15;
  google.protobuf.FieldMask mask = 16;
  google.protobuf.Int64Value opt_i64 = 17;
  google.protobuf.StringValue opt_str = 18;
  google.protobuf.BoolValue opt_bool = 19;
  Inner inner = 20;
  map<string, string> labels = 21;
  repeated Inner inners = 22;
  oneof choice {
    string pick_a = 23;
    int32 pick_b = 24;
  }
  map<int32, string> by_number = 25;
  fixed64 f64 = 26;
}

message Reply {
  Everything item = 1;
  repeated string names = 2;
  int64 total = 3;
}

service TestService {
  rpc Get(Everything) returns (Reply) {
    option (google.api.http) = {
      get: "/t/things/{id}"
      additional_bindings { get: "/t/inner/{inner.name}/things/{id}" }
      additional_bindings { post: "/t/things/{id}:touch" body: "*" }
    };
  }
  rpc PutInner(Everything) returns (Reply) {
    option (google.api.http) = {
      put: "/t/things/{id}/inner"
      body: "inner"
      response_body: "item"
    };
  }
  rpc PutTags(Everything) returns (Reply) {
    option (google.api.http) = {
      post: "/t/things/{id}/tags"
      body: "tags"
      response_body: "names"
    };
  }
  rpc Total(Everything) returns (Reply) {
    option (google.api.http) = {
      get: "/t/total"
      response_body: "total"
    };
  }
  rpc Deep(Everything) returns (Reply) {
    option (google.api.http) = {get: "/t/files/{id=**}"};
  }
  rpc Watch(Everything) returns (stream Reply) {
    option (google.api.http) = {custom: {kind: "REPORT", path: "/t/watch/{inner.leaf.flag}"}};
  }
}
"""


# The test file depends on these; importing them loads them into the default pool first.
_DEPENDENCIES = (annotations_pb2, duration_pb2, field_mask_pb2, timestamp_pb2, wrappers_pb2)


def _compile() -> FileDescriptor:
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName("cyberdesk/transcodetest/test.proto")
    except KeyError:
        pass
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "cyberdesk" / "transcodetest"
        src.mkdir(parents=True)
        (src / "test.proto").write_text(PROTO)
        out = Path(tmp) / "set.binpb"
        rc = protoc.main(
            [
                "protoc",
                f"-I{tmp}",
                f"-I{ROOT / 'proto' / 'vendor'}",
                f"-I{well_known}",
                f"--descriptor_set_out={out}",
                "cyberdesk/transcodetest/test.proto",
            ]
        )
        assert rc == 0, "protoc failed on the test proto"
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool.AddSerializedFile(fds.file[0].SerializeToString())
    return pool.FindFileByName("cyberdesk/transcodetest/test.proto")


@pytest.fixture(scope="session")
def test_table() -> BindingTable:
    """The binding table of the test service."""
    return build_binding_table([_compile()])


@pytest.fixture(scope="session")
def api_table() -> BindingTable:
    """The binding table of the REST face: cyberdesk.v1 and the operators' AuthService."""
    return build_binding_table()
