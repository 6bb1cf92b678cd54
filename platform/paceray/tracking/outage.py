"""A bounded wait for a tracking server that went away, per phase of a command (a search's start,
its end): an outage costs a step only if it outlasts the wait. The trials' own writes and every
run's end are queued on disk meanwhile (paceray.tracking.spool), so what is skipped here is only
what the driver itself would have written then."""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

from paceray.tracking import server as mlflow_server

WAIT_ENV = "PACERAY_DRIVER_WAIT"  # s the driver waits for an MLflow server that went away, per phase
WAIT = 300.0


class ServerWait:
    """One bounded wait for the tracking server in a phase of the search (its start, its end),
    shared by that phase's steps: an outage costs a step only if it outlasts the wait."""

    def __init__(self, uri: str, phase: str):
        self.uri, self.phase = uri, phase
        self.deadline: Optional[float] = None

    def server_back(self) -> bool:
        if mlflow_server.answers(self.uri):
            return True
        if self.deadline is None:
            wait = float(os.environ.get(WAIT_ENV, WAIT))
            self.deadline = time.monotonic() + wait
            print(f"paceray: MLflow at {self.uri} is unreachable at the {self.phase} of the search; waiting up to "
                  f"{wait:.0f} s ({WAIT_ENV}) for it", file=sys.stderr, flush=True)
        while time.monotonic() < self.deadline:
            time.sleep(2.0)
            if mlflow_server.answers(self.uri):
                return True
        return False


def unless_away(wait: ServerWait, what: str, fn, *args) -> bool:
    """Run one of the driver's MLflow steps; if the server is away and does not come back within
    the phase's wait, say what waits and go on (the trials' own writes and every run's end are
    queued on disk). True if it ran. Any other error is raised. A probe first: each MLflow call
    on a server that is gone waits out MLflow's retries (seconds each) before it fails."""
    def skipped(e: str) -> bool:
        print(f"warning: MLflow at {wait.uri} is unreachable; skipped {what} ({e})", file=sys.stderr, flush=True)
        return False

    for attempt in range(2):  # a server that goes away mid-step gets the wait once more
        if not wait.server_back():
            return skipped("no answer")
        try:
            fn(*args)
            return True
        except Exception as e:
            if mlflow_server.answers(wait.uri):
                raise
            if attempt == 1:
                return skipped(type(e).__name__)
    return False
