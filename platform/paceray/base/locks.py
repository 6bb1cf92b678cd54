"""Lock files only one process holds at a time, and the command lock built on them: one command
at a time per search and per `paceray train` run (a second `paceray tune` of the same spec and run
directory would rename the live search's tuner folder and mix its trials; a second `paceray train
--resume` would train the same run twice).

A lock is an O_EXCL file holding host, pid and a token, safe on a shared volume. A holder on this
host that died is detected by its pid at once; one on another host by the lock's age, so the
command lock's holder touches it every HEARTBEAT_S while it runs.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from paceray.base.errors import PacerayError

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


# ---------------------------------------------------------------------- the command lock
HEARTBEAT_S = 60.0
MAX_AGE_S = 10 * HEARTBEAT_S  # a lock from another host untouched this long: its holder is gone
LOCK_NAME = "command.lock"


def _lock(path: Path, wait: float):
    """lock(), its folder made again whenever the holder we waited on removed it on leaving."""
    deadline = time.monotonic() + wait
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            token = lock(path, wait=min(0.5, max(0.0, deadline - time.monotonic())), max_age=MAX_AGE_S)
        except FileNotFoundError:
            token = None
        if token is not None or time.monotonic() >= deadline:
            return token


@contextmanager
def held(folder: Path, what: str, wait: float = 0.0) -> Iterator[None]:
    """Hold the lock of `folder` for the body, or fail in one line naming its holder. Folders made
    for the lock alone go again if the body left them empty (a command refused later, e.g. by a
    cluster too small for one trial, leaves nothing behind). `wait`: seconds to wait for a live
    holder first (saying so once), for work a second command must not do twice but may wait on."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    path = folder / LOCK_NAME
    token = _lock(path, 0.0)  # makes the folder
    if token is None and wait > 0:
        holder = lock_holder(path) or {}
        print(f"waiting for {what} of pid {holder.get('pid', '?')} on {holder.get('host', '?')} (lock {path}) …",
              flush=True)
        token = _lock(path, wait)
    if token is None:
        holder = lock_holder(path) or {}
        raise PacerayError(f"{what} is already running (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
                           f"lock {path}): wait for it to end or stop it; a lock whose holder died is taken over")
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            holds(path, token)

    beat = threading.Thread(target=heartbeat, name="paceray-command-lock", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        unlock(path, token)
        for p in made:  # innermost first
            try:
                p.rmdir()
            except OSError:  # not empty: the command wrote there
                break
