"""One command at a time per search and per `paceray train` run: a second `paceray tune` of the
same spec and run directory would rename the live search's tuner folder and mix its trials; a
second `paceray train --resume` would train the same run twice.

The lock is the queue's kind (paceray.atomic.lock: an O_EXCL file holding host, pid and a token,
safe on a shared volume). A holder on this host that died is detected by its pid at once; one on
another host by the lock's age, so the holder touches it every HEARTBEAT_S while it runs.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from paceray import atomic
from paceray.errors import PacerayError

HEARTBEAT_S = 60.0
MAX_AGE_S = 10 * HEARTBEAT_S  # a lock from another host untouched this long: its holder is gone
LOCK_NAME = "command.lock"


def _lock(path: Path, wait: float):
    """atomic.lock, its folder made again whenever the holder we waited on removed it on leaving."""
    deadline = time.monotonic() + wait
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            token = atomic.lock(path, wait=min(0.5, max(0.0, deadline - time.monotonic())), max_age=MAX_AGE_S)
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
        holder = atomic.lock_holder(path) or {}
        print(f"waiting for {what} of pid {holder.get('pid', '?')} on {holder.get('host', '?')} (lock {path}) …",
              flush=True)
        token = _lock(path, wait)
    if token is None:
        holder = atomic.lock_holder(path) or {}
        raise PacerayError(f"{what} is already running (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
                           f"lock {path}): wait for it to end or stop it; a lock whose holder died is taken over")
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            atomic.holds(path, token)

    beat = threading.Thread(target=heartbeat, name="paceray-command-lock", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        atomic.unlock(path, token)
        for p in made:  # innermost first
            try:
                p.rmdir()
            except OSError:  # not empty: the command wrote there
                break
