"""`paceray report EXPERIMENT`: the latest search's report (the trainable's, through its hook), from MLflow."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from paceray.base.errors import PacerayError
from paceray.base.paths import RunDir, default_run_dir
from paceray.tracking import server as mlflow_server


def resolve_tracking_uri(tracking_uri: Optional[str], run_dir: Optional[str]) -> str:
    """--tracking-uri > MLFLOW_TRACKING_URI > the embedded SQLite store under the run directory.

    Reading the SQLite file directly is safe here (report only reads), so no server is started;
    the file must exist, or MLflow would quietly create an empty store.
    """
    uri = mlflow_server.external_uri(tracking_uri)
    if uri:
        mlflow_server.check_reachable(uri)
        return uri
    rd = Path(run_dir).expanduser().resolve() if run_dir else default_run_dir()
    db = RunDir(rd).store_db
    if not db.is_file():
        raise PacerayError(f"{db}: no embedded MLflow store here; pass --run-dir of a paceray run, "
                           f"or --tracking-uri / MLFLOW_TRACKING_URI of the server the search logged to")
    return f"sqlite:///{db}"


def run_report(experiment: str, tracking_uri: Optional[str] = None, run_dir: Optional[str] = None,
               out: Optional[str] = None, target: Optional[float] = None) -> None:
    from paceray.report import search as report

    if target is not None and not math.isfinite(target):
        raise PacerayError(f"--target: a finite value of the search metric, not {target}")
    uri = resolve_tracking_uri(tracking_uri, run_dir)
    rep = report.report_for_experiment(uri, experiment, target)
    print(rep.text, flush=True)
    stranded = report.stranded_queues(uri, experiment)
    if stranded:
        print(f"\ntrial queue(s) the search's end found undelivered ({len(stranded)}):", flush=True)
        for line in stranded:
            print(f"  {line}", flush=True)
    if out:
        paths = report.write_outputs(rep, out)
        print(f"\nwrote {', '.join(p.name for p in paths)} to {paths[0].parent}")
