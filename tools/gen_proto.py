"""Generate the Python code of proto/ (messages, gRPC stubs and mypy stubs) with grpcio-tools.

The output is the package `cyberdesk_proto` (`v1`, `agent/v1`, `internal/v1`), which holds nothing
but generated code and is neither the SDK nor any service: both import it. protoc names Python
modules after the proto files' paths (`cyberdesk/v1/instance.proto` -> `cyberdesk.v1.instance_pb2`),
so the code is generated into a scratch tree and its module references are rewritten to
`cyberdesk_proto.…` on the way out (the approach of protoletariat). Only references to `_pb2`
modules are rewritten: the serialized descriptors and the method paths keep the proto package
names (`cyberdesk.v1.InstanceService`), which are the wire contract. google/api comes from
googleapis-common-protos at run time, so the vendored copy under proto/vendor is only an include path.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
PACKAGE = "cyberdesk_proto"
# proto folder (below proto/cyberdesk) -> folder of the generated package
OUT_DIRS = ["v1", "agent", "internal"]
# `cyberdesk.v1.instance_pb2`, `from cyberdesk.v1 import instance_pb2`: module references only.
_MODULE_REF = re.compile(r"\bcyberdesk\.((?:v1|agent\.v1|internal\.v1))(?=\.\w+_pb2\b| import )")


def generate(root: Path) -> int:
    """Write the package `cyberdesk_proto` below `root`; returns protoc's exit code."""
    with tempfile.TemporaryDirectory() as scratch:
        rc = _protoc(Path(scratch))
        if rc != 0:
            return rc
        out = root / PACKAGE
        for rel in OUT_DIRS:
            shutil.rmtree(out / rel, ignore_errors=True)
        for src in sorted((Path(scratch) / "cyberdesk").rglob("*")):
            if not src.is_file():
                continue
            dest = out / src.relative_to(Path(scratch) / "cyberdesk")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(_MODULE_REF.sub(PACKAGE + r".\1", src.read_text()))
        # Mark the generated packages typed; namespace folders need no __init__.py.
        for rel in OUT_DIRS:
            for d in (out / rel).rglob("*"):
                if d.is_dir() and any(d.glob("*_pb2.py")):
                    (d / "py.typed").touch()
    return 0


def _protoc(out: Path) -> int:
    sources = sorted(str(p.relative_to(PROTO)) for p in (PROTO / "cyberdesk").rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # protoc finds the mypy plugins on PATH; put the interpreter's bin dir first.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO}",
        f"-I{PROTO / 'vendor'}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out=quiet:{out}",
        f"--mypy_grpc_out=quiet:{out}",
        *sources,
    ]
    cwd = os.getcwd()
    os.chdir(PROTO)
    try:
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    return int(rc)


def _tree(base: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(base)): p
        for rel in OUT_DIRS
        for p in (base / PACKAGE / rel).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def check() -> int:
    """Exit non-zero when the committed generated code differs from what proto/ generates."""
    with tempfile.TemporaryDirectory() as tmp:
        rc = generate(Path(tmp))
        if rc != 0:
            return rc
        fresh, committed = _tree(Path(tmp)), _tree(ROOT)
        stale = sorted(
            name
            for name in fresh.keys() | committed.keys()
            if name not in fresh or name not in committed or not filecmp.cmp(fresh[name], committed[name], False)
        )
    if stale:
        print("generated code is stale; run `make proto` and commit:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only verify the committed code is fresh")
    args = parser.parse_args()
    return check() if args.check else generate(ROOT)


if __name__ == "__main__":
    raise SystemExit(main())
