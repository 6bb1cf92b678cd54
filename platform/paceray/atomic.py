"""Files written whole or not at all: a reader (or a crash) never sees half of one. Also lines
appended whole, and lock files only one process holds at a time."""

from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Optional


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
    from paceray.errors import PacerayError, one_line

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


# ---------------------------------------------------------------------- lock files
# A lock is a file made with O_EXCL, naming its holder's host, pid and the pid's start time
# (pids are reused). A holder on this host that is gone is taken over at once; another host's
# cannot be asked (a shared volume), so its lock stands until untouched for `max_age` (a
# holder calls holds() as it works, which touches it).

HOST = socket.gethostname()


def lock(path: Path, wait: float = 0.0, max_age: float = 15 * 60.0) -> Optional[str]:
    """A token proving we hold the lock at `path`, or None if a live holder kept it for `wait` s."""
    deadline = time.monotonic() + wait
    while (token := _try_lock(Path(path), max_age)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return token


def holds(path: Path, token: str) -> bool:
    """Whether we still hold it (not taken over as stale); touches it, so it stays fresh."""
    if (lock_holder(path) or {}).get("token") != token:
        return False
    os.utime(path)
    return True


def unlock(path: Path, token: str) -> None:
    if (lock_holder(path) or {}).get("token") == token:
        Path(path).unlink(missing_ok=True)


def lock_holder(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _try_lock(path: Path, max_age: float) -> Optional[str]:
    me = {"host": HOST, "pid": os.getpid(), "started": _started(os.getpid()), "token": uuid.uuid4().hex}
    if _create(path, me):
        return me["token"]
    holder = lock_holder(path)
    if not _stale(holder, path, max_age):
        return None
    # Two processes may both find it stale: only the one that makes the guard breaks it (else
    # one could remove the lock the other just made).
    guard = path.with_name(path.name + ".takeover")
    if not _create(guard, me):
        if _age(guard) > 60:  # its maker died mid-takeover
            guard.unlink(missing_ok=True)
        return None
    try:
        if lock_holder(path) == holder:
            path.unlink(missing_ok=True)
        return me["token"] if _create(path, me) else None
    finally:
        guard.unlink(missing_ok=True)


def _create(path: Path, content: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, json.dumps(content).encode())
    finally:
        os.close(fd)
    return True


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _started(pid: int) -> Optional[str]:
    """The process's start time (Linux), telling a live holder from a new process with its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _stale(holder: Optional[dict], path: Path, max_age: float) -> bool:
    try:
        if holder["host"] != HOST:
            return _age(path) > max_age
        pid = int(holder["pid"])
    except (TypeError, KeyError, ValueError):  # unreadable (or still being written)
        return _age(path) > max_age
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    started = _started(pid)
    return bool(holder.get("started") and started and holder["started"] != started)
