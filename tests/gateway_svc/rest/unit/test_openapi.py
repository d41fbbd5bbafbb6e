"""The generated OpenAPI 3.1 document: valid, complete, described, and committed fresh."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from gateway_svc.rest.http_bindings import BindingTable
from gateway_svc.rest.openapi import build_document
from tools import gen_openapi

ROOT = Path(__file__).resolve().parents[4]


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    """The document as tools/gen_openapi.py renders it (with the proto comments)."""
    out: dict[str, Any] = json.loads(gen_openapi.render())
    return out


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    validate(document)


def test_document_without_comments_is_valid_too() -> None:
    validate(build_document())


def test_committed_document_is_fresh(document: dict[str, Any]) -> None:
    committed = json.loads((ROOT / "openapi" / "cyberdesk.v1.openapi.json").read_text())
    assert committed == document, "run `make proto` (tools/gen_openapi.py) and commit the document"


def test_every_rpc_has_an_operation(document: dict[str, Any], api_table: BindingTable) -> None:
    operations = {op["operationId"] for item in document["paths"].values() for op in item.values()}
    for service in api_table.services:
        for method in service.methods:
            if method.full_name != "cyberdesk.internal.v1.AuthService.VerifyKey":  # gRPC only
                assert f"{service.name}_{method.name}" in operations, method.full_name
    assert "InstanceService_ListSnapshots_1" in operations  # the additional binding
    assert len(operations) == len(api_table.bindings)


def test_every_operation_and_field_is_described(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        for verb, op in item.items():
            assert op.get("description"), f"{verb} {path}"
            for param in op.get("parameters", []):
                assert param.get("description"), f"{verb} {path} {param['name']}"
    for name, schema in document["components"]["schemas"].items():
        assert schema.get("description"), name
        for prop, sub in schema.get("properties", {}).items():
            assert sub.get("description"), f"{name}.{prop}"


def test_proto3_json_mapping_in_schemas(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    instance = schemas["cyberdesk.v1.Instance"]["properties"]
    assert instance["createTime"]["type"] == "string" and instance["createTime"]["format"] == "date-time"
    assert instance["state"]["$ref"] == "#/components/schemas/cyberdesk.v1.InstanceState"
    assert instance["labels"]["additionalProperties"] == {"type": "string"}
    assert instance["enforcedLimits"]["items"]["$ref"] == "#/components/schemas/cyberdesk.v1.EnforcedLimit"
    assert schemas["cyberdesk.v1.EnforcedLimit"]["properties"]["value"]["type"] == "string"  # int64
    assert schemas["cyberdesk.v1.TakeScreenshotResponse"]["properties"]["image"]["contentEncoding"] == "base64"
    create = document["paths"]["/v1/instances"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert create["properties"]["timeout"]["pattern"].endswith("s$")  # Duration as "1.5s"
    assert "INSTANCE_STATE_RUNNING" in schemas["cyberdesk.v1.InstanceState"]["enum"]
    assert "oneof `event`" in schemas["cyberdesk.v1.WatchDirectoryResponse"]["description"]
    assert schemas["google.rpc.Status"]["required"] == ["code", "message"]


def test_streams_security_and_errors(document: dict[str, Any]) -> None:
    paths = document["paths"]
    start = paths["/v1/instances/{instance_id}/processes"]["post"]["responses"]["200"]["content"]
    assert set(start) == {"application/x-ndjson", "text/event-stream"}
    assert start["application/x-ndjson"]["schema"]["properties"]["error"]["$ref"].endswith("google.rpc.Status")
    download = paths["/v1/instances/{instance_id}/files/{path}"]["get"]["responses"]
    assert "application/octet-stream" in download["200"]["content"] and "206" in download
    assert "101" in paths["/v1/instances/{instance_id}/pty"]["get"]["responses"]
    stream_in = paths["/v1/instances/{instance_id}/processes/{pid}:streamInput"]["post"]["requestBody"]
    assert "application/x-ndjson" in stream_in["content"]
    create = paths["/v1/instances"]["post"]
    assert create["responses"]["default"]["content"]["application/json"]["schema"]["$ref"].endswith("Status")
    body_props = paths["/v1/instances/{instance_id}:setTimeout"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]["properties"]
    assert set(body_props) == {"timeout"}  # the path-bound instance_id is not in the body
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"]["scheme"] == "bearer" and schemes["apiKeyHeader"]["name"] == "x-api-key"
    assert document["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}]
