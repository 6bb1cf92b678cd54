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

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not glibc Linux: the parent's own stop() still ends us
        pass


def _end_group(pgid: int, grace: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
        if proc is not None:
            proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)  # stragglers
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        return 1
    proc = subprocess.Popen(argv, start_new_session=True)

    def stop(signum, _frame):
        _end_group(proc.pid, proc=proc)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    rc = proc.wait()
    _end_group(proc.pid, grace=0)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
