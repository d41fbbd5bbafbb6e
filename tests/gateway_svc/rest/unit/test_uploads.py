"""The upload's query: the options of the header message by their short names as well as in full."""

from __future__ import annotations

from gateway_svc.rest.http_bindings import BindingTable
from gateway_svc.rest.uploads import upload_query

UPLOAD = "cyberdesk.v1.FilesystemService.UploadFile"


def test_short_names_mean_fields_of_the_header(api_table: BindingTable) -> None:
    (binding,) = api_table.for_method(UPLOAD)
    pairs = upload_query(binding, b"overwrite=true&mode=420&createParents=true&expectedSha256=ab")
    assert pairs == [
        ("header.overwrite", "true"),
        ("header.mode", "420"),
        ("header.createParents", "true"),
        ("header.expectedSha256", "ab"),
    ]


def test_full_names_and_top_level_fields_stay(api_table: BindingTable) -> None:
    (binding,) = api_table.for_method(UPLOAD)
    assert upload_query(binding, b"header.overwrite=1&instance_id=i-1") == [
        ("header.overwrite", "1"),
        ("instance_id", "i-1"),
    ]


def test_other_bindings_are_left_alone(api_table: BindingTable) -> None:
    # Only a binding whose path fills exactly one nested message gets the short names.
    (binding,) = api_table.for_method("cyberdesk.v1.InstanceService.GetInstance")
    assert upload_query(binding, b"overwrite=true") == [("overwrite", "true")]
