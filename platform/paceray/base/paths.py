"""Where things live: the run directory (results, checkpoints, the embedded MLflow store) and
the storage root (what trainables prepare once and every trial reads: datasets, feature nets, …).

Both are absolute from the start: under `ray job submit` the entrypoint's cwd is an ephemeral
unpacked copy of the working dir, and Tune/Train workers chdir into trial folders.
"""

from __future__ import annotations

import os
from pathlib import Path


def inside_ray_job() -> bool:
    """True in a `ray job submit` entrypoint (its cwd is a throwaway copy of the working dir)."""
    return bool(os.environ.get("RAY_JOB_SUBMISSION_ID")) or "runtime_resources" in Path.cwd().parts


def default_run_dir() -> Path:
    if inside_ray_job():
        return Path.home() / "paceray" / "runs"
    return (Path.cwd() / "runs").resolve()


def storage_root() -> Path:
    """What trainables prepare once (datasets, feature nets, cached statistics), shared by every trial."""
    env = os.environ.get("PACERAY_STORAGE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "paceray"
    return root.resolve()


class RunDir:
    """The run directory's whole layout, decided here and nowhere else:

        mlflow.db, mlartifacts/, mlflow-server.log   the embedded MLflow store and its server's log
        mlflow-spool/RUN_ID/                          a run's queued writes (paceray.tracking.spool)
        ray/SEARCH/                                   Ray Tune's folder of a search
        ray/SEARCH/trials/trial-ID/                   a Tune trial's Ray Train run (checkpoints)
        ray/TRIAL_ID/                                 a `paceray train` run's Ray Train run
        searches/SEARCH/search.json, workers.log      a search's state (for --resume) and Ray's worker output
        searches/SEARCH/trials/TRIAL_ID.json          which runs a trial owns, and how each ended
        train/NAME/latest.json                        the latest `paceray train` of a spec (for --resume)
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ------------------------------------------------------------------ the embedded tracking store
    @property
    def store_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def store_uri(self) -> str:
        return f"sqlite:///{self.store_db}"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def server_log(self) -> Path:
        return self.root / "mlflow-server.log"

    @property
    def queues(self) -> Path:
        return self.root / "mlflow-spool"

    def queue(self, run_id: str) -> Path:
        return self.queues / run_id

    # ------------------------------------------------------------------ Ray's folders
    @property
    def ray_results(self) -> Path:
        return self.root / "ray"

    def tuner(self, search: str) -> Path:
        return self.ray_results / search

    def tune_trials(self, search: str) -> Path:
        return self.tuner(search) / "trials"

    def trial_results(self, trial_id: str) -> Path:
        """A `paceray train` trial's Ray Train run."""
        return self.ray_results / trial_id

    # ------------------------------------------------------------------ paceray's own state
    def search(self, name: str) -> Path:
        return self.root / "searches" / name

    def search_state(self, name: str) -> Path:
        return self.search(name) / "search.json"

    def workers_log(self, name: str) -> Path:
        return self.search(name) / "workers.log"

    def arm_scheduler(self, search: str) -> Path:
        """A packed search's arm scheduler state (paceray.cluster.arm_scheduler)."""
        return self.search(search) / "arm_scheduler.json"

    def trial_records(self, search: str) -> Path:
        return self.search(search) / "trials"

    def train_pointer(self, name: str) -> Path:
        return self.root / "train" / name / "latest.json"
