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
