"""WatchDirectory against a real agent: inotify events for changes made on disk."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from cyberdesk_proto.v1 import filesystem_pb2 as fs
from cyberdesk_proto.v1 import filesystem_pb2_grpc
from tests.guest_agent.integration.conftest import RunningAgent

Seen = tuple[int, str, str, bool]  # type, path, old_path, is_directory


def _watch(agent: RunningAgent, path: Path, recursive: bool) -> Iterator[fs.WatchDirectoryResponse]:
    stub = filesystem_pb2_grpc.FilesystemServiceStub(agent.channel)
    request = fs.WatchDirectoryRequest(instance_id=agent.instance_id, path=str(path), recursive=recursive)
    stream: Iterator[fs.WatchDirectoryResponse] = stub.WatchDirectory(request, metadata=agent.metadata, timeout=30)
    return stream


def _until(stream: Iterator[fs.WatchDirectoryResponse], done: Callable[[list[Seen]], bool]) -> list[Seen]:
    """Events from `stream` until `done` holds (the call's 30 s deadline fails a missing event)."""
    seen: list[Seen] = []
    for message in stream:
        change = message.change
        seen.append((change.type, change.path, change.old_path, change.is_directory))
        assert change.event_time.seconds > 0
        if done(seen):
            return seen
    raise AssertionError(f"stream ended early after {seen}")


def test_events_for_create_modify_chmod_rename_remove(bound_agent: RunningAgent, tmp_path: Path) -> None:
    root = tmp_path / "watched"
    root.mkdir()
    stream = _watch(bound_agent, root, recursive=False)
    assert next(stream).WhichOneof("event") == "started"

    target = root / "a.txt"
    with open(target, "wb") as handle:
        handle.write(b"one")
        handle.flush()
        handle.write(b"two")
    os.chmod(target, 0o600)
    os.rename(target, root / "b.txt")
    os.unlink(root / "b.txt")
    os.mkdir(root / "sub")
    last = (fs.FILESYSTEM_EVENT_TYPE_CREATE, str(root / "sub"), "", True)
    seen = _until(stream, lambda s: last in s)
    stream.cancel()  # type: ignore[attr-defined]

    a, b = str(root / "a.txt"), str(root / "b.txt")
    assert seen[0] == (fs.FILESYSTEM_EVENT_TYPE_CREATE, a, "", False)
    assert (fs.FILESYSTEM_EVENT_TYPE_MODIFY, a, "", False) in seen
    assert (fs.FILESYSTEM_EVENT_TYPE_CHMOD, a, "", False) in seen
    assert (fs.FILESYSTEM_EVENT_TYPE_RENAME, b, a, False) in seen
    assert (fs.FILESYSTEM_EVENT_TYPE_REMOVE, b, "", False) in seen
    order = [kind for kind, *_ in seen if kind != fs.FILESYSTEM_EVENT_TYPE_MODIFY]
    assert order == [
        fs.FILESYSTEM_EVENT_TYPE_CREATE,
        fs.FILESYSTEM_EVENT_TYPE_CHMOD,
        fs.FILESYSTEM_EVENT_TYPE_RENAME,
        fs.FILESYSTEM_EVENT_TYPE_REMOVE,
        fs.FILESYSTEM_EVENT_TYPE_CREATE,
    ]


def test_recursive_watch_follows_new_and_moved_directories(bound_agent: RunningAgent, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "existing").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    stream = _watch(bound_agent, root, recursive=True)
    assert next(stream).WhichOneof("event") == "started"

    # Each step waits for its events: a recursive inotify watch can only follow a new directory
    # that still exists when its creation is read (true of every inotify-based watcher).
    def step(action: Callable[[], object], *expected: Seen) -> list[Seen]:
        action()
        return _until(stream, lambda s: all(e in s for e in expected))

    step(
        lambda: (root / "existing" / "f1").write_bytes(b"x"),
        (fs.FILESYSTEM_EVENT_TYPE_CREATE, str(root / "existing" / "f1"), "", False),
    )
    # `mkdir -p` and a file made at once: what appeared before the new watch is reported as created.
    step(
        lambda: (os.makedirs(root / "new" / "deeper"), (root / "new" / "deeper" / "f2").write_bytes(b"y")),
        (fs.FILESYSTEM_EVENT_TYPE_CREATE, str(root / "new"), "", True),
        (fs.FILESYSTEM_EVENT_TYPE_CREATE, str(root / "new" / "deeper"), "", True),
        (fs.FILESYSTEM_EVENT_TYPE_CREATE, str(root / "new" / "deeper" / "f2"), "", False),
    )
    step(
        lambda: os.rename(root / "new", root / "renamed"),
        (fs.FILESYSTEM_EVENT_TYPE_RENAME, str(root / "renamed"), str(root / "new"), True),
    )
    # The watches below a moved directory report under its new name.
    step(
        lambda: (root / "renamed" / "deeper" / "f3").write_bytes(b"z"),
        (fs.FILESYSTEM_EVENT_TYPE_CREATE, str(root / "renamed" / "deeper" / "f3"), "", False),
    )
    step(
        lambda: os.rename(root / "existing" / "f1", outside / "f1"),  # moved out of the tree: a removal
        (fs.FILESYSTEM_EVENT_TYPE_REMOVE, str(root / "existing" / "f1"), "", False),
    )
    step(
        lambda: shutil.rmtree(root / "renamed"),
        (fs.FILESYSTEM_EVENT_TYPE_REMOVE, str(root / "renamed" / "deeper" / "f3"), "", False),
        (fs.FILESYSTEM_EVENT_TYPE_REMOVE, str(root / "renamed"), "", True),
    )
    stream.cancel()  # type: ignore[attr-defined]


def test_watch_ends_when_the_directory_is_removed(bound_agent: RunningAgent, tmp_path: Path) -> None:
    root = tmp_path / "short-lived"
    root.mkdir()
    stream = _watch(bound_agent, root, recursive=False)
    assert next(stream).WhichOneof("event") == "started"
    root.rmdir()
    rest = [m.change for m in stream]
    assert (rest[-1].type, rest[-1].path) == (fs.FILESYSTEM_EVENT_TYPE_REMOVE, str(root))


def test_watch_errors(bound_agent: RunningAgent, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    for path, code in [
        (tmp_path / "missing", grpc.StatusCode.NOT_FOUND),
        (tmp_path / "file", grpc.StatusCode.FAILED_PRECONDITION),
        (Path("relative"), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            next(_watch(bound_agent, path, recursive=True))
        assert err.value.code() == code, err.value.details()
