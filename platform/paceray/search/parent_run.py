"""A search's parent run in MLflow: made with the search's parameters and tags, its spec logged,
its comparison view in MLflow's UI, and at the end the report, the best trial's config, its
exported model and the model's registration."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import yaml

from paceray.protocol import keys
from paceray.search.tuner import trial_id_of
from paceray.tracking import client as tracking
from paceray.tracking import server as mlflow_server


def search_params(loaded) -> dict:
    t, r = loaded.spec.tune, loaded.spec.resources
    params = {f"search.{k}": f"{d.kind}{list(d.args)}" for k, d in loaded.search.items()}
    params.update({f"tune.{k}": v for k, v in t.model_dump().items()})
    params.update({f"resources.{k}": v for k, v in r.model_dump().items()})
    params["trainable"] = loaded.spec.trainable
    return params


def log_spec(uri: str, parent: str, loaded) -> None:
    c = tracking.client(uri)
    c.log_text(parent, Path(loaded.spec.path).read_text() if loaded.spec.path else "", "spec/spec.yaml")
    resolved = {"base": loaded.base, "search": {k: {d.kind: list(d.args)} for k, d in loaded.search.items()},
                "overrides": loaded.overrides}
    c.log_text(parent, yaml.safe_dump(resolved, sort_keys=False), "spec/resolved.yaml")


def save_comparison(uri: str, parent: str, loaded, with_metrics: bool) -> None:
    """The search's view in MLflow's UI (paceray.tracking.ui_view); at the end, with every metric its
    trials logged, so that the UI adds no chart of its own for them."""
    from paceray.tracking import ui_view

    c = tracking.client(uri)
    experiment_id = c.get_run(parent).info.experiment_id
    logged: set[str] = set()
    if with_metrics:
        for run in c.search_runs([experiment_id], filter_string=f"tags.`{keys.PARENT_TAG}` = '{parent}'"):
            logged.update(run.data.metrics)
    view = ui_view.Comparison(loaded.spec.name, loaded.metric, loaded.mode, tuple(loaded.search), tuple(sorted(logged)))
    ui_view.save_comparison(c, experiment_id, parent, view)


def comparison_url(uri: str, parent: str, base: str) -> Optional[str]:
    """The URL under `base` of the search's view, if the tracking store `uri` is a server that
    answers now (for the embedded store, `base` is where `paceray ui` serves it)."""
    from paceray.tracking import ui_view

    if not uri.startswith(("http://", "https://")) or not mlflow_server.answers(uri):
        return None
    try:
        run = tracking.client(uri).get_run(parent)
    except Exception:
        return None
    return ui_view.comparison_url(base, run.info.experiment_id, run.data.tags.get(keys.VIEW_TAG))


def finish(uri: str, parent: str, loaded, results) -> None:
    """The parent run gets the report (the trainable's, through its hook), the best trial's config
    and its exported model."""
    from paceray.report import search as report

    summary = report.log_to_parent(uri, parent)
    save_comparison(uri, parent, loaded, with_metrics=True)
    try:
        best = results.get_best_result(metric=loaded.metric, mode=loaded.mode, scope="all", filter_nan_and_inf=True)
    except RuntimeError:  # no trial reported the metric
        best = None
    if best is not None and best.config is not None:
        c = tracking.client(uri)
        c.log_dict(parent, best.config, "best/config.json")
        export = loaded.trainable.export
        ckpt, value = best_checkpoint(best, loaded.metric, loaded.mode)
        if export is not None and ckpt is not None:
            with tempfile.TemporaryDirectory() as tmp:
                export(ckpt, best.config, str(Path(tmp) / "pipeline"))
                c.log_artifacts(parent, str(Path(tmp) / "pipeline"), "best/pipeline")
            c.set_tag(parent, keys.BEST_CHECKPOINT_TAG, ckpt)
            from paceray.tracking.model_registry import register_best

            version = register_best(c, parent, loaded.spec.name, "best/pipeline",
                                    {keys.TRIAL_TAG: trial_id_of(best) or "", loaded.metric: value})
            if version:
                print(f"best model registered: models:/{version}", flush=True)
    print()
    print(summary.text)
    where = report.html_location(uri, parent)
    if where:
        print(f"\nthe report as one page: {where}")


def best_checkpoint(result, metric: str, mode: str) -> tuple[Optional[str], Optional[float]]:
    """The checkpoint of the trial's best report and its metric: TuneReportCallback forwards each
    checkpoint's path as the `checkpoint_path` metric, and Ray keeps the best K by the metric."""
    df = result.metrics_dataframe
    if df is None or metric not in df or "checkpoint_path" not in df:
        return None, None
    df = df.dropna(subset=[metric, "checkpoint_path"])
    if df.empty:
        return None, None
    row = df.loc[df[metric].idxmin() if mode == "min" else df[metric].idxmax()]
    path = str(row["checkpoint_path"])
    return (path, float(row[metric])) if Path(path).exists() else (None, None)
