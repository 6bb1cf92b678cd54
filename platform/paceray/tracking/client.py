"""MLflow runs the platform owns: the experiment, one parent run per search, one child per trial.

The tracking URI is `--tracking-uri` > `MLFLOW_TRACKING_URI` > the embedded store
(paceray.tracking.server, which also runs the server). A run's life — find, create, resume, end —
is paceray.tracking.run.Run's, its status the trial runner's (paceray.trial.runner).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from paceray.protocol.keys import EXPERIMENT_KIND


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name, tags=EXPERIMENT_KIND)
    if exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
    for key, value in EXPERIMENT_KIND.items():  # an experiment made before, or by someone else
        if exp.tags.get(key) != value:
            c.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    c = client(uri)
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
        c.log_batch(run_id, params=items[i:i + 100])


def find_run(uri: str, experiment: str, tags: Mapping[str, str]) -> Optional[str]:
    """The id of the run in `experiment` carrying all `tags` (latest first), if any."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = c.search_runs([exp.experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def create_run(uri: str, experiment: str, run_name: str, tags: Mapping[str, str],
               params: Optional[Mapping[str, Any]] = None) -> str:
    c = client(uri)
    run = c.create_run(experiment_id(uri, experiment), run_name=run_name, tags=dict(tags))
    if params:
        log_params(uri, run.info.run_id, params)
    return run.info.run_id


def fetch_artifact(uri: str, run_id: str, artifact_path: str) -> bytes:
    """The bytes of one small artifact of a run (a trainable's `PrepareContext.fetch_artifact`,
    bound to the store with functools.partial); LookupError saying why when it cannot be read."""
    import os
    import tempfile

    import mlflow.artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no bar
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, tracking_uri=uri,
                                                        dst_path=tmp)
        except Exception as e:  # MlflowException: no such run or artifact
            raise LookupError(str(e)) from None
        with open(local, "rb") as f:
            return f.read()
