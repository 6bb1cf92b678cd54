"""A search's parent run in MLflow: made with the search's parameters and tags, its spec logged,
its comparison view in MLflow's UI, and at the end the report, the best trial's config, its
exported model and the model's registration."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import yaml

from paceray.protocol import keys, packing
from paceray.search.tuner import trial_id_of
from paceray.tracking import client as tracking
from paceray.tracking import server as mlflow_server


def search_params(loaded) -> dict:
    t, r = loaded.spec.tune, loaded.spec.resources
    params = {f"search.{k}": f"{d.kind}{list(d.args)}" for k, d in loaded.search.items()}
    params.update({f"arms.{i}": ", ".join(f"{k}={v}" for k, v in arm.items()) for i, arm in enumerate(loaded.arms)})
    params.update({f"tune.{k}": v for k, v in t.model_dump().items()})
    params.update({f"resources.{k}": v for k, v in r.model_dump().items()})
    params["trainable"] = loaded.spec.trainable
    return params


def log_spec(uri: str, parent: str, loaded) -> None:
    c = tracking.client(uri)
    c.log_text(parent, Path(loaded.spec.path).read_text() if loaded.spec.path else "", "spec/spec.yaml")
    resolved = {"base": loaded.base, "search": {k: {d.kind: list(d.args)} for k, d in loaded.search.items()},
                "arms": loaded.arms, "overrides": loaded.overrides}
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
    from paceray.spec.space import searched_paths

    # Replicates read as arms: one line per arm over its seeds.
    group = keys.ARM_TAG if loaded.spec.tune.seeds else None
    view = ui_view.Comparison(loaded.spec.name, loaded.metric, loaded.mode, searched_paths(loaded),
                              tuple(sorted(logged)), group)
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
        ckpt, value, config = best_arm(best, loaded.metric, loaded.mode)
        c.log_dict(parent, config, "best/config.json")
        export = loaded.trainable.export
        if export is not None and ckpt is not None:
            with tempfile.TemporaryDirectory() as tmp:
                export(ckpt, config, str(Path(tmp) / "pipeline"))
                c.log_artifacts(parent, str(Path(tmp) / "pipeline"), "best/pipeline")
            c.set_tag(parent, keys.BEST_CHECKPOINT_TAG, ckpt)
            from paceray.tracking.model_registry import register_best

            version = register_best(c, parent, loaded.spec.name, "best/pipeline",
                                    {keys.TRIAL_TAG: _arm_id(best, ckpt), loaded.metric: value})
            if version:
                print(f"best model registered: models:/{version}", flush=True)
    print()
    print(summary.text)
    where = report.html_location(uri, parent)
    if where:
        print(f"\nthe report as one page: {where}")


def _arm_id(result, ckpt: str) -> str:
    """The id of the trial (or of the arm of a pack) the best checkpoint belongs to."""
    trial = trial_id_of(result) or ""
    return f"{trial}-{Path(ckpt).name}" if packing.is_packed(result.config) else trial


def best_arm(result, metric: str, mode: str) -> tuple[Optional[str], Optional[float], dict]:
    """The best checkpoint of a trial, its metric and the config it was trained with: for a packed
    trial, the best arm's folder within the pack's checkpoint and that arm's config (each report
    names the arm whose metric it carries: paceray.protocol.packing.BEST_ARM_KEY)."""
    ckpt, value = best_checkpoint(result, metric, mode)
    if not packing.is_packed(result.config):
        return ckpt, value, packing.arms_of(result.config)[0]
    df = result.metrics_dataframe
    arms = packing.arms_of(result.config)
    arm = packing.arm_key(0)
    if ckpt is not None and df is not None and packing.BEST_ARM_KEY in df:
        arm = str(df.loc[df["checkpoint_path"].astype(str) == ckpt, packing.BEST_ARM_KEY].iloc[-1])
    return (str(Path(ckpt) / arm) if ckpt else None), value, arms[int(arm.removeprefix("a"))]


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
