"""FilesystemService: checks each request and hands it to the module of its concern.

Transfers (UploadFile, DownloadFile) are done by `transfer`, operations on the tree (stat, list,
mkdir, move, remove) by `fs_tree`, watches by `watch`; how a failed call becomes a status is in
`fs_errors`. This module owns what is common to every call: the `instance_id` check, request
fields, running blocking tree operations off the event loop, and building the replies.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from cyberdesk import keep_large_blocks
from cyberdesk_common.status import invalid_argument
from cyberdesk_proto.v1 import filesystem_pb2, filesystem_pb2_grpc
from guest_agent import fs_tree
from guest_agent.fs_errors import require_absolute
from guest_agent.identity import Identity
from guest_agent.transfer import TransferEngine
from guest_agent.watch import watch_directory


class FilesystemServicer(filesystem_pb2_grpc.FilesystemServiceServicer):
    """Serves cyberdesk.v1.FilesystemService inside an instance."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity
        # Megabyte messages otherwise cost a page-faulting mmap per allocation (see cyberdesk._malloc).
        keep_large_blocks()
        self._transfers = TransferEngine()

    async def UploadFile(
        self,
        request_iterator: AsyncIterator[filesystem_pb2.UploadFileRequest],
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> filesystem_pb2.UploadFileResponse:
        """Receive a header, chunks and a trailer; write a temporary file, rename it onto the target on the trailer."""
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("data") != "header":
            raise invalid_argument("the first message of an upload must carry the header (path, mode, ...)")
        self._identity.check(first.instance_id)
        return await self._transfers.upload(first.header, messages)

    async def DownloadFile(
        self,
        request: filesystem_pb2.DownloadFileRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[filesystem_pb2.DownloadFileResponse]:
        """Stream a file, or the range [offset, offset+length), in chunks; the last carries the sha256."""
        self._identity.check(request.instance_id)
        # aclosing: a cancelled call closes the engine's generator at once, so its descriptor is
        # released then rather than whenever the generator is collected.
        async with contextlib.aclosing(self._transfers.download(request)) as chunks:
            async for message in chunks:
                yield message

    async def StatUpload(
        self,
        request: filesystem_pb2.StatUploadRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> filesystem_pb2.StatUploadResponse:
        """How many bytes an interrupted named upload holds: the offset to resume it from."""
        self._identity.check(request.instance_id)
        stored = await self._transfers.stat_upload(request.path, request.upload_id)
        return filesystem_pb2.StatUploadResponse(stored_size=stored)

    async def StatPath(
        self,
        request: filesystem_pb2.StatPathRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> filesystem_pb2.StatPathResponse:
        """Metadata of a path; a symlink is described itself, with its target."""
        self._identity.check(request.instance_id)
        path = require_absolute(request.path, "path")
        st = await asyncio.to_thread(fs_tree.stat_path, path)
        return filesystem_pb2.StatPathResponse(info=fs_tree.file_info(path, st))

    async def ListDirectory(
        self,
        request: filesystem_pb2.ListDirectoryRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> filesystem_pb2.ListDirectoryResponse:
        """Entries below a directory down to `depth` levels (default 1), sorted by path."""
        self._identity.check(request.instance_id)
        path = require_absolute(request.path, "path")
        if request.depth < 0:
            raise invalid_argument(f"depth must be >= 1 (0 means 1), got {request.depth}")
        entries = await asyncio.to_thread(fs_tree.list_tree, path, request.depth or 1)
        return filesystem_pb2.ListDirectoryResponse(entries=entries)

    async def MakeDirectory(
        self,
        request: filesystem_pb2.MakeDirectoryRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> filesystem_pb2.MakeDirectoryResponse:
        """Create a directory; with `parents`, its missing parents too, and an existing one is fine."""
        self._identity.check(request.instance_id)
        path = require_absolute(request.path, "path")
        if request.mode > 0o7777:
            raise invalid_argument(f"mode must be permission bits (at most 0o7777), got {oct(request.mode)}")
        st = await asyncio.to_thread(fs_tree.make_directory, path, request.parents, request.mode or 0o755)
        return filesystem_pb2.MakeDirectoryResponse(info=fs_tree.file_info(path, st))

    async def MovePath(
        self,
        request: filesystem_pb2.MovePathRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> filesystem_pb2.MovePathResponse:
        """Rename a file or directory; across file systems it is copied then removed."""
        self._identity.check(request.instance_id)
        source = require_absolute(request.source, "source")
        destination = require_absolute(request.destination, "destination")
        st = await asyncio.to_thread(fs_tree.move_path, source, destination, request.overwrite)
        return filesystem_pb2.MovePathResponse(info=fs_tree.file_info(destination, st))

    async def RemovePath(
        self,
        request: filesystem_pb2.RemovePathRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> filesystem_pb2.RemovePathResponse:
        """Remove a file, a symlink (not its target), or a directory (`recursive` unless empty)."""
        self._identity.check(request.instance_id)
        path = require_absolute(request.path, "path")
        if path == "/":
            raise invalid_argument("refusing to remove /")
        await asyncio.to_thread(fs_tree.remove_path, path, request.recursive)
        return filesystem_pb2.RemovePathResponse()

    async def WatchDirectory(
        self,
        request: filesystem_pb2.WatchDirectoryRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[filesystem_pb2.WatchDirectoryResponse]:
        """`started` once the watch is in place, then one message per change below the directory."""
        self._identity.check(request.instance_id)
        path = require_absolute(request.path, "path")
        async for message in watch_directory(path, request.recursive):
            yield message
