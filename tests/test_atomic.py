"""Files written whole or not at all, and durably: data fsynced before the rename, the
directory after it; a failure leaves no temporary file and the old content in place."""

from __future__ import annotations

import os
import stat

import pytest

from paceray.base import atomic, locks


def _record(monkeypatch):
    """Every fsync (what it flushed: a regular file's inode or a directory) and rename, in order."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync dir" if stat.S_ISDIR(st.st_mode) else "fsync file", st.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_write_atomic_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "state.json"
    path.parent.mkdir()
    path.write_text("old")
    events = _record(monkeypatch)
    atomic.write_text_atomic(path, "new")
    assert path.read_text() == "new"
    ino, dir_ino = path.stat().st_ino, path.parent.stat().st_ino
    assert events == [("fsync file", ino), ("replace", ino), ("fsync dir", dir_ino)]


def test_write_atomic_with_a_callback_writing_by_name_is_fsynced_too(tmp_path, monkeypatch):
    events = _record(monkeypatch)
    atomic.write_atomic(tmp_path / "blob.bin", lambda tmp: open(tmp, "wb").write(b"\0" * 10))
    assert [e for e, _ in events] == ["fsync file", "replace", "fsync dir"]


@pytest.mark.parametrize("fails", ["write", "fsync"])
def test_a_failed_write_leaves_no_temporary_file_and_the_old_content(tmp_path, monkeypatch, fails):
    path = tmp_path / "state.json"
    path.write_text("old")

    def write(tmp):
        open(tmp, "w").write("half")
        if fails == "write":
            raise OSError(28, "No space left on device")

    if fails == "fsync":
        def fsync(fd):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        atomic.write_atomic(path, write)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_temporary_names_are_unique(tmp_path, monkeypatch):
    seen = []
    atomic.write_atomic(tmp_path / "f", lambda tmp: seen.append(tmp) or open(tmp, "w").write("1"))
    atomic.write_atomic(tmp_path / "f", lambda tmp: seen.append(tmp) or open(tmp, "w").write("2"))
    assert len(set(seen)) == 2 and (tmp_path / "f").read_text() == "2"


def test_append_line_fences_a_torn_tail(tmp_path):
    path = tmp_path / "log.jsonl"
    atomic.append_line(path, b"a\n")
    with open(path, "ab") as f:
        f.write(b"to")  # a writer died mid-line
    atomic.append_line(path, b"b\n")
    atomic.append_line(path, b"")  # nothing torn: nothing written
    assert path.read_bytes() == b"a\nto\nb\n"


def test_a_lock_is_held_by_one_token_at_a_time(tmp_path):
    path = tmp_path / "x.lock"
    mine = locks.lock(path)
    assert mine and locks.lock(path, wait=0.1) is None  # this process is alive: respected
    assert locks.holds(path, mine) and not locks.holds(path, "other")
    locks.unlock(path, "other")
    assert path.exists()
    locks.unlock(path, mine)
    assert not path.exists() and locks.lock(path)
