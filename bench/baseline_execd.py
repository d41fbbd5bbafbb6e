"""The baseline: a minimal HTTP/JSON execD written with FastAPI, the way the original design had it.

It lives in bench/ only, to compare the guest agent against. Endpoints:
  POST /exec {"command": ...}   -> runs it with a shell, returns {stdout, stderr, exit_code}
  PUT  /files/{path}            -> streams the raw body to a file under --root
  GET  /files/{path}            -> streams the file back
Run: python -m bench.baseline_execd --port 8080 --root /tmp/x
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

CHUNK = 1024 * 1024


class ExecRequest(BaseModel):
    """Body of POST /exec."""

    command: str
    cwd: str | None = None
    timeout: float | None = None


class ExecResponse(BaseModel):
    """Reply of POST /exec: the whole output, decoded, once the command is over."""

    stdout: str
    stderr: str
    exit_code: int


def create_app(root: Path) -> FastAPI:
    """The execD application serving files under `root`."""
    app = FastAPI()

    def resolve(path: str) -> Path:
        target = (root / path).resolve()
        if root.resolve() not in target.parents and target != root.resolve():
            raise HTTPException(400, "path escapes the root")
        return target

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/exec")
    def run(body: ExecRequest) -> ExecResponse:  # sync: FastAPI runs it in its thread pool
        done = subprocess.run(
            body.command, shell=True, capture_output=True, cwd=body.cwd, timeout=body.timeout, check=False
        )
        return ExecResponse(
            stdout=done.stdout.decode(errors="replace"),
            stderr=done.stderr.decode(errors="replace"),
            exit_code=done.returncode,
        )

    @app.put("/files/{path:path}")
    async def upload(path: str, request: Request) -> dict[str, int]:
        target = resolve(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        with open(target, "wb") as fh:  # noqa: ASYNC230 - the original wrote synchronously as well
            async for chunk in request.stream():
                fh.write(chunk)
                size += len(chunk)
        return {"size": size}

    @app.get("/files/{path:path}")
    def download(path: str) -> FileResponse:
        target = resolve(path)
        if not target.is_file():
            raise HTTPException(404, "no such file")
        return FileResponse(target, media_type="application/octet-stream")

    return app


def main() -> None:
    """Serve the baseline with uvicorn."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--root", type=Path, default=Path("/tmp/execd"))
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    uvicorn.run(create_app(args.root), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
