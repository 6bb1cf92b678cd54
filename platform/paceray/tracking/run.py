"""An MLflow run's life as the tracking store sees it: found or created by its identity tags,
resumed, and ended with the status and tags its owner decided (a trial's runs: paceray.trial.runner;
a search's parent run: paceray.search.driver).

Ending a run first delivers what the run's processes queued on disk and did not send (a worker
killed mid-write); if the server is away, the end itself joins that queue (paceray.tracking.spool) and
the owner returns the command that replays it, so the run's writes arrive in order, end last.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

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
        """Where this run's processes queue their writes (paceray.tracking.runlog)."""
        return runlog.spool_dir(self.run_dir, self.run_id)

    def deliver_leftovers(self) -> bool:
        """Deliver what the run's processes queued and did not send; True when nothing is left."""
        return not self.queue.exists() or spool.drain(self.queue, spool.mlflow_deliverer(self.uri))

    # ------------------------------------------------------------------ ending

    def end(self, status: str, tags: Optional[Mapping[str, str]] = None, remove_tags: tuple[str, ...] = ()) -> Optional[str]:
        """Set `tags`, delete `remove_tags` and end the run, after what its processes queued; if the
        server is away, queue the tags and the end behind the run's other writes and return the
        command that replays them. What the status is, and why, is the trial runner's to say
        (paceray.trial.runner); this is how a run is ended."""
        if mlflow_server.answers(self.uri) and self.deliver_leftovers():
            try:
                c = tracking.client(self.uri)
                present = self.info().data.tags if remove_tags else {}
                for k in remove_tags:
                    if k in present:
                        c.delete_tag(self.run_id, k)
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

    def say_waiting(self, left: Optional[str]) -> None:
        """Warn on stderr that the run's last writes wait on disk (`left`: the replay command)."""
        if left:
            print(f"warning: MLflow at {self.uri} is unreachable; run {self.run_id}'s last writes wait on disk: "
                  f"{left}", file=sys.stderr, flush=True)
