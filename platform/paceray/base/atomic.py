"""Files written whole or not at all: a reader (or a crash) never sees half of one; lines
appended whole. Lock files are paceray.base.locks'."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path` in one rename.
    Concurrent writers of the same content race harmlessly; a failed write leaves no trace.

    Durable too: the temporary file's data reach the disk before the rename (else a power cut
    can leave `path` renamed but empty), and the directory after it (else the rename itself
    can be lost)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)  # `write` wrote by name: reopen it; fsync flushes the file, whichever fd
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def read_state(path: Path, what_to_do: str) -> dict:
    """A JSON state file written by write_text_atomic; unreadable (a disk failure, a hand edit, a
    copy cut short), it is one line naming it and `what_to_do`, not a JSONDecodeError traceback."""
    from paceray.base.errors import PacerayError, one_line

    try:
        state = json.loads(Path(path).read_text())
        if not isinstance(state, dict):
            raise ValueError(f"a JSON {type(state).__name__}, not an object")
        return state
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise PacerayError(one_line(f"{path}: unreadable ({e}); {what_to_do}")) from None


def fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (a file created or renamed in it) durable, where the platform
    and file system can (not on Windows; some network and FUSE file systems refuse it)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def append_line(path: Path, line: bytes) -> None:
    """Append `line` (ending in a newline) in one write, durably. If the file does not end with a
    newline (a writer killed or out of disk mid-line), one goes first: the torn fragment stays a
    bad line of its own instead of corrupting this one. With `line` empty, this only fences such
    a tail. O_APPEND writes are serialized by the kernel: a fence racing a live append (in this
    or another process on this host) at worst adds a blank line."""
    path = Path(path)
    created = not path.exists()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | (os.O_CREAT if line else 0), 0o644)
    except FileNotFoundError:
        if line:
            raise
        return  # no file: nothing to fence
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        if not line:
            return
        while line:  # more than one write only after a short one (disk full): torn anyway
            line = line[os.write(fd, line):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)
