"""Write the OpenAPI 3.1 document of the REST face to openapi/cyberdesk.v1.openapi.json (run by `make proto`).

The proto comments become the descriptions; the Python descriptors carry none, so the protos are
compiled here once more with source info (grpc_tools.protoc --include_source_info) to read them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc_tools
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway_svc.rest.openapi import build_document, comments_from_descriptor_set  # noqa: E402

PROTO = ROOT / "proto"
OUT = ROOT / "openapi" / "cyberdesk.v1.openapi.json"


# The REST face's protos (gateway_svc.rest.http_bindings.default_modules): cyberdesk.v1 and the
# operators' key management.
SOURCES = ("cyberdesk/v1/*.proto", "cyberdesk/internal/v1/auth.proto")


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """The REST face's protos compiled with their comments."""
    sources = sorted(str(p.relative_to(PROTO)) for pattern in SOURCES for p in PROTO.glob(pattern))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "v1.binpb"
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO}",
            f"-I{PROTO / 'vendor'}",
            f"-I{well_known}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {', '.join(sources)}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def render() -> str:
    """The document as it is committed: indented JSON with a final newline."""
    doc: dict[str, Any] = build_document(comments=comments_from_descriptor_set(descriptor_set()))
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only verify the committed document is fresh")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale; run `make proto` and commit", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
