"""`python -m paceray.supervise CMD...`: run CMD in its own process group and end that whole group
when this process is told to stop or its parent dies (Linux PR_SET_PDEATHSIG).

The embedded `mlflow server` leaves huey_consumer children behind after SIGTERM, and a
`paceray` killed by SIGKILL cannot clean up after itself: this keeps no server orphaned.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not glibc Linux: the parent's own stop() still ends us
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str], grace: float = 10.0) -> int:
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        return 1
    proc = subprocess.Popen(argv, start_new_session=True)
    stop_since: list[float] = []

    def stop(signum, _frame):
        # Only signal here; the loop below waits (waiting inside a handler can deadlock on Popen's lock).
        _signal_group(proc.pid, signal.SIGTERM)
        stop_since.append(time.monotonic())

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        try:
            rc = proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if stop_since and time.monotonic() - stop_since[0] > grace:
                _signal_group(proc.pid, signal.SIGKILL)
    _signal_group(proc.pid, signal.SIGKILL)  # stragglers (huey consumers, uvicorn workers)
    return 128 + signal.SIGTERM if stop_since else rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
