"""Tree operations of FilesystemService called directly on a temporary directory (no agent, no gRPC).

The integration tests (tests/guest_agent/integration/test_files.py) check the same operations
through a real agent; these pin the rules of `guest_agent.fs_tree` where they are decided.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from cyberdesk_common.status import RpcError
from cyberdesk_proto.v1 import filesystem_pb2 as fs
from guest_agent import fs_tree
from guest_agent.fs_errors import os_error, require_absolute


def test_list_tree_sorts_by_path_and_stops_at_depth(tmp_path: Path) -> None:
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "b" / "deep" / "leaf").write_bytes(b"x")
    (tmp_path / "a.txt").write_bytes(b"hello")
    one = [info.path for info in fs_tree.list_tree(str(tmp_path), 1)]
    assert one == [str(tmp_path / "a.txt"), str(tmp_path / "b")]
    three = [info.path for info in fs_tree.list_tree(str(tmp_path), 3)]
    assert three == [
        str(tmp_path / "a.txt"),
        str(tmp_path / "b"),
        str(tmp_path / "b" / "deep"),
        str(tmp_path / "b" / "deep" / "leaf"),
    ]


def test_list_tree_does_not_descend_symlinked_directories(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "inside").write_bytes(b"")
    (tmp_path / "real" / "loop").symlink_to(tmp_path)  # would never end if followed
    entries = {info.path: info for info in fs_tree.list_tree(str(tmp_path), 5)}
    loop = entries[str(tmp_path / "real" / "loop")]
    assert loop.type == fs.FILE_TYPE_SYMLINK
    assert loop.symlink_target == str(tmp_path)
    assert sorted(entries) == [str(tmp_path / "real"), str(tmp_path / "real" / "inside"), str(loop.path)]


def test_list_tree_of_a_file_or_a_huge_tree_is_failed_precondition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(RpcError) as err:
        fs_tree.list_tree(str(tmp_path / "f"), 1)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(RpcError) as err:
        fs_tree.list_tree(str(tmp_path / "missing"), 1)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    for n in range(4):
        (tmp_path / f"g{n}").write_bytes(b"")
    monkeypatch.setattr(fs_tree, "MAX_LIST_ENTRIES", 3)
    with pytest.raises(RpcError) as err:
        fs_tree.list_tree(str(tmp_path), 1)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "smaller depth" in err.value.message


def test_file_info_describes_type_size_mode_and_name(tmp_path: Path) -> None:
    path = tmp_path / "script.sh"
    path.write_bytes(b"#!/bin/sh\n")
    path.chmod(0o750)
    info = fs_tree.file_info(str(path), fs_tree.stat_path(str(path)))
    assert (info.name, info.type, info.size, info.mode) == ("script.sh", fs.FILE_TYPE_FILE, 10, 0o750)
    assert info.modify_time.ToNanoseconds() == path.stat().st_mtime_ns
    assert fs_tree.file_info("/", os.lstat("/")).name == "/"
    assert fs_tree.file_type(os.lstat("/dev/null").st_mode) == fs.FILE_TYPE_OTHER


def test_make_directory_rules(tmp_path: Path) -> None:
    made = fs_tree.make_directory(str(tmp_path / "new"), parents=False, mode=0o700)
    assert made.st_mode & 0o777 == 0o700
    with pytest.raises(RpcError) as err:
        fs_tree.make_directory(str(tmp_path / "new"), parents=False, mode=0o755)
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    fs_tree.make_directory(str(tmp_path / "new"), parents=True, mode=0o755)  # like mkdir -p: fine
    with pytest.raises(RpcError) as err:
        fs_tree.make_directory(str(tmp_path / "x" / "y"), parents=False, mode=0o755)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    fs_tree.make_directory(str(tmp_path / "x" / "y"), parents=True, mode=0o755)
    assert (tmp_path / "x" / "y").is_dir()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(RpcError) as err:
        fs_tree.make_directory(str(tmp_path / "file"), parents=True, mode=0o755)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_move_path_rules(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"A")
    (tmp_path / "b").write_bytes(b"B")
    (tmp_path / "dir").mkdir()
    with pytest.raises(RpcError) as err:
        fs_tree.move_path(str(tmp_path / "a"), str(tmp_path / "b"), overwrite=False)
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(RpcError) as err:
        fs_tree.move_path(str(tmp_path / "a"), str(tmp_path / "dir"), overwrite=True)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(RpcError) as err:
        fs_tree.move_path(str(tmp_path / "dir"), str(tmp_path / "b"), overwrite=True)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(RpcError) as err:
        fs_tree.move_path(str(tmp_path / "a"), str(tmp_path / "nowhere" / "a"), overwrite=False)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(RpcError) as err:
        fs_tree.move_path(str(tmp_path / "missing"), str(tmp_path / "c"), overwrite=False)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    same = fs_tree.move_path(str(tmp_path / "a"), str(tmp_path / "a"), overwrite=False)
    assert same.st_size == 1
    fs_tree.move_path(str(tmp_path / "a"), str(tmp_path / "b"), overwrite=True)
    assert (tmp_path / "b").read_bytes() == b"A"
    assert not (tmp_path / "a").exists()


def test_remove_path_rules(tmp_path: Path) -> None:
    (tmp_path / "full" / "sub").mkdir(parents=True)
    (tmp_path / "target").write_bytes(b"kept")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    fs_tree.remove_path(str(tmp_path / "link"), recursive=False)
    assert (tmp_path / "target").read_bytes() == b"kept"  # the link goes, never its target
    with pytest.raises(RpcError) as err:
        fs_tree.remove_path(str(tmp_path / "full"), recursive=False)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "recursive" in err.value.message
    fs_tree.remove_path(str(tmp_path / "full"), recursive=True)
    assert not (tmp_path / "full").exists()
    with pytest.raises(RpcError) as err:
        fs_tree.remove_path(str(tmp_path / "full"), recursive=True)
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_os_error_maps_errno_and_names_the_path() -> None:
    full = os_error(OSError(28, "No space left on device"), "/data/f", "write")
    assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert full.message == "cannot write /data/f: no space left on device"
    odd = os_error(OSError(1234, "Strange failure"), "/x", "read")
    assert (odd.code, odd.message) == (grpc.StatusCode.UNKNOWN, "cannot read /x: Strange failure")


def test_require_absolute_normalises_or_refuses() -> None:
    assert require_absolute("//home/user/../user/./f/", "path") == "/home/user/f"
    for bad in ("", "relative/f", "/nul\x00byte"):
        with pytest.raises(RpcError) as err:
            require_absolute(bad, "path")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "path" in err.value.message
