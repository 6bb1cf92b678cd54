"""MLflow runs the platform owns: the experiment, one parent run per search, one child per trial.

The tracking URI is `--tracking-uri` > `MLFLOW_TRACKING_URI` > the embedded store
(paceray.mlflow_server, which also runs the server). A run's life — find, create, resume, end —
is paceray.runs.Run's.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from paceray.protocol import ERROR_TAG, TRIAL_TAG  # noqa: F401  (tags of every trial's run)

PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "paceray.kind"  # "search" or "trial"
TRAINABLE_TAG = "paceray.trainable"  # which trainable's hooks read the runs back
METRIC_TAG = "paceray.metric"  # the search metric and its mode, for reports without the spec
MODE_TAG = "paceray.mode"
# MLflow 3's UI opens an experiment without this tag on its GenAI overview, not on its runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


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
