"""One owner of an MLflow run's life: found or created by its identity tags, resumed, and ended
once — finished, failed with its reason, or killed by a scheduler — by `paceray train`, by each
Tune trial and by the search driver alike.

Ending a run first delivers what the run's processes queued on disk and did not send (a worker
killed mid-write); if the server is away, the end itself joins that queue (paceray.spool) and
the owner returns the command that replays it, so the run's writes arrive in order, end last.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from paceray.base.errors import one_line
from paceray.protocol.keys import ERROR_TAG, STOPPED_TAG
from paceray.tracking import client as tracking
from paceray.tracking import runlog, spool
from paceray.tracking import server as mlflow_server


@dataclass
class Run:
    uri: str
    run_id: str
    run_dir: Path

    # ------------------------------------------------------------------ finding, creating

    @classmethod
    def find(cls, uri: str, experiment: str, identity: Mapping[str, str], run_dir: Path) -> Optional["Run"]:
        run_id = tracking.find_run(uri, experiment, identity)
        return cls(uri, run_id, run_dir) if run_id else None

    @classmethod
    def create(cls, uri: str, experiment: str, name: str, tags: Mapping[str, str], run_dir: Path,
               params: Optional[Mapping[str, Any]] = None) -> "Run":
        return cls(uri, tracking.create_run(uri, experiment, name, tags, params), run_dir)

    @classmethod
    def find_or_create(cls, uri: str, experiment: str, identity: Mapping[str, str], name: str,
                       tags: Mapping[str, str], run_dir: Path, params: Optional[Mapping[str, Any]] = None) -> "Run":
        """The run carrying `identity` (a restarted trial, a resumed search), else a new one: a
        trial never gets a second run."""
        return (cls.find(uri, experiment, identity, run_dir)
                or cls.create(uri, experiment, name, {**identity, **tags}, run_dir, params))

    # ------------------------------------------------------------------ state

    def info(self):
        return tracking.client(self.uri).get_run(self.run_id)

    @property
    def status(self) -> str:
        return self.info().info.status

    def resume(self) -> bool:
        """Mark the run RUNNING again; True (and untouched) if it had already finished."""
        if self.status == "FINISHED":
            return True
        tracking.client(self.uri).update_run(self.run_id, status="RUNNING")
        return False

    @property
    def queue(self) -> Path:
        """Where this run's processes queue their writes (paceray.runlog)."""
        return runlog.spool_dir(self.run_dir, self.run_id)

    def deliver_leftovers(self) -> bool:
        """Deliver what the run's processes queued and did not send; True when nothing is left."""
        return not self.queue.exists() or spool.drain(self.queue, spool.mlflow_deliverer(self.uri))

    # ------------------------------------------------------------------ ending

    def finish(self) -> Optional[str]:
        return self.end("FINISHED")

    def fail(self, reason: str) -> Optional[str]:
        """FAILED, with the reason's last line in the run (Ray wraps a worker's error in its traceback)."""
        text = str(reason).strip()
        return self.end("FAILED", {ERROR_TAG: one_line(text.splitlines()[-1] if text else "failed")[:4000]})

    def kill(self, stopped_by: str) -> Optional[str]:
        """KILLED by a scheduler before its last step: not a crash, so a stale error tag goes."""
        if mlflow_server.answers(self.uri) and self.deliver_leftovers():
            try:
                if ERROR_TAG in self.info().data.tags:
                    tracking.client(self.uri).delete_tag(self.run_id, ERROR_TAG)
            except Exception:
                pass
        return self.end("KILLED", {STOPPED_TAG: stopped_by})

    def end(self, status: str, tags: Optional[Mapping[str, str]] = None) -> Optional[str]:
        """Set `tags` and end the run; if the server is away, queue both behind the run's other
        writes and return the command that replays them."""
        if mlflow_server.answers(self.uri) and self.deliver_leftovers():
            try:
                c = tracking.client(self.uri)
                for k, v in (tags or {}).items():
                    c.set_tag(self.run_id, k, v)
                c.set_terminated(self.run_id, status=status)
                return None
            except Exception:
                pass
        if tags:
            spool.append(self.queue, {"kind": "tags", "run_id": self.run_id, "tags": dict(tags)})
        spool.append(self.queue, {"kind": "terminate", "run_id": self.run_id, "status": status})
        return runlog.replay_command(self.queue, self.uri)

    def end_and_say(self, status: str, reason: Optional[str] = None,
                    tags: Optional[Mapping[str, str]] = None) -> Optional[str]:
        """`fail(reason)` or `end(status, tags)`, warning on stderr when the end waits on disk."""
        left = self.fail(reason) if status == "FAILED" and reason else self.end(status, tags)
        self.say_waiting(left)
        return left

    def say_waiting(self, left: Optional[str]) -> None:
        """Warn on stderr that the run's last writes wait on disk (`left`: the replay command)."""
        if left:
            print(f"warning: MLflow at {self.uri} is unreachable; run {self.run_id}'s last writes wait on disk: "
                  f"{left}", file=sys.stderr, flush=True)
