"""A search read back from MLflow: its trials, their searched parameters and the search metric.

`paceray report` prints it any time; `paceray tune` logs it to the search's parent run when the
search ends. The platform's own report knows only what every search has — the searched
parameters (the parent's `search.*` params), the metric and its mode (the parent's tags) — and
shows the table sorted by the best value of the metric. A trainable's report hook
(`Trainable.report`, chosen by the parent's `paceray.trainable` tag) builds the domain analysis
instead: arms, baselines, intervals, plots.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from paceray.base.atomic import write_atomic
from paceray.base.errors import PacerayError, one_line
from paceray.protocol import BEST_TRIAL_TAG, ERROR_TAG, keys
from paceray.protocol.report_hook import SearchRuns
from paceray.tracking import client as tracking
from paceray.tracking import stranded_queues as stranded

DASH = "—"


# ---------------------------------------------------------------- reading MLflow

def search_all(client, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment(client, name: str):
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments())
        raise PacerayError(f"MLflow experiment {name!r} not found (experiments there: {', '.join(names) or 'none'}); "
                           f"pass the spec's name, and --tracking-uri/--run-dir of the store the search wrote to")
    return exp


def _searched(params: dict) -> list[str]:
    return sorted(k.removeprefix("search.") for k in params if k.startswith("search."))


def report_for_experiment(uri: str, experiment: str, target: Optional[float] = None):
    """The latest search of `experiment`; without any search, its `paceray train` runs.
    `target`: SearchRuns.target."""
    client = tracking.client(uri)
    exp = _experiment(client, experiment)
    searches = search_all(client, exp.experiment_id, f"tags.`{keys.KIND_TAG}` = 'search'")
    if searches:
        return report_for_parent(uri, searches[-1].info.run_id, target)
    trials = [r for r in search_all(client, exp.experiment_id, f"tags.`{keys.KIND_TAG}` = 'trial'")
              if keys.PARENT_TAG not in r.data.tags]
    if not trials:
        raise PacerayError(f"MLflow experiment {experiment!r} has no paceray search or trial runs yet")
    tags = trials[-1].data.tags
    runs = SearchRuns(client, experiment, "runs of `paceray train` (no search)", None, tags.get(keys.METRIC_TAG),
                      tags.get(keys.MODE_TAG, "min"), [], trials, target=target)
    return build(runs, tags.get(keys.TRAINABLE_TAG))


def stranded_queues(uri: str, experiment: str) -> list[str]:
    """The latest search's trial queues its end found undelivered, one line each (the parent's
    tag, paceray.tracking.stranded_queues)."""
    client = tracking.client(uri)
    searches = search_all(client, _experiment(client, experiment).experiment_id, f"tags.`{keys.KIND_TAG}` = 'search'")
    if not searches:
        return []
    return [stranded.describe(q, uri) for q in stranded.from_tag(searches[-1].data.tags.get(stranded.TAG))]


def report_for_parent(uri: str, parent_run_id: str, target: Optional[float] = None):
    """The trials (child runs) of one search, finished or still running."""
    client = tracking.client(uri)
    try:
        parent = client.get_run(parent_run_id)
    except Exception as e:  # MlflowException: unknown id
        raise PacerayError(f"MLflow run {parent_run_id!r} not found at {uri}: {one_line(e)[:200]}") from None
    experiment = client.get_experiment(parent.info.experiment_id).name
    children = search_all(client, parent.info.experiment_id, f"tags.`{keys.PARENT_TAG}` = '{parent_run_id}'")
    tags = parent.data.tags
    runs = SearchRuns(client, experiment, f"search run {parent_run_id} ({parent.info.run_name}, {parent.info.status})",
                      parent_run_id, tags.get(keys.METRIC_TAG), tags.get(keys.MODE_TAG, "min"),
                      _searched(parent.data.params), children,
                      {k.removeprefix("search."): v for k, v in parent.data.params.items() if k.startswith("search.")},
                      target=target)
    return build(runs, tags.get(keys.TRAINABLE_TAG))


def build(runs: SearchRuns, trainable: Optional[str]):
    """The trainable's report when it has a hook, else the platform's own."""
    if trainable:
        from paceray.spec import registry

        try:
            hook = registry.resolve(trainable, "the search's paceray.trainable tag").report
        except PacerayError:
            hook = None  # a trainable not installed here: the generic report still reads the runs
        if hook is not None:
            return hook().build(runs)
    return GenericReport.build(runs)


# ---------------------------------------------------------------- the generic report

def _fmt(x, digits: int = 4) -> str:
    if x is None or x is pd.NA or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


@dataclass
class GenericReport:
    runs: SearchRuns
    table: pd.DataFrame
    best_trial: Optional[str]

    @classmethod
    def build(cls, runs: SearchRuns) -> "GenericReport":
        rows = []
        for run in runs.runs:
            h = runs.history(run.info.run_id, runs.metric) if runs.metric else pd.Series(dtype=float)
            finite = h[h.map(math.isfinite)] if len(h) else h
            best_step = (finite.idxmin() if runs.mode == "min" else finite.idxmax()) if len(finite) else None
            row = {"trial": run.data.tags.get(keys.TRIAL_TAG) or run.info.run_name, "status": run.info.status}
            row.update({k: run.data.params.get(k) for k in runs.searched})
            row.update({"best": finite[best_step] if best_step is not None else math.nan, "best_step": best_step,
                        "final": h.iloc[-1] if len(h) else math.nan,
                        "error": one_line(run.data.tags[ERROR_TAG]) if run.data.tags.get(ERROR_TAG) else None,
                        "run_id": run.info.run_id})
            rows.append(row)
        columns = ["trial", "status", *runs.searched, "best", "best_step", "final", "error", "run_id"]
        table = pd.DataFrame(rows, columns=columns)
        table["best"] = table["best"].astype(float)
        table = table.sort_values("best", ascending=runs.mode == "min", na_position="last").reset_index(drop=True)
        scored = table[table["best"].map(math.isfinite)]
        return cls(runs, table, str(scored.iloc[0]["trial"]) if len(scored) else None)

    @property
    def text(self) -> str:
        r, t = self.runs, self.table
        counts = ", ".join(f"{n} {s.lower()}" for s, n in t["status"].value_counts().items())
        metric = f"{r.metric} ({'lower' if r.mode == 'min' else 'higher'} is better)" if r.metric else "no metric"
        lines = [f"paceray report {r.experiment}: {r.source}; {len(t)} trials ({counts or 'none yet'})",
                 f"metric: {metric}", ""]
        if t.empty:
            return "\n".join(lines + ["(no trials yet)"])
        shown = t.drop(columns=["run_id"]).rename(columns={"best": f"best {r.metric}", "final": f"final {r.metric}"})
        for col in shown.columns:
            shown[col] = shown[col].map(lambda v: _fmt(v)[:70] if v is not None else DASH)
        lines += [line.rstrip() for line in shown.to_string(index=False).splitlines()]
        if self.best_trial:
            best = t.iloc[0]
            lines += ["", f"* best trial: {self.best_trial}, {r.metric} {_fmt(best['best'])} at step {best['best_step']}"]
        return "\n".join(lines)

    def files(self) -> dict[str, Callable[[Path], None]]:
        return {"trials.csv": lambda p: self.table.to_csv(p, index=False)}

    def parent_tags(self) -> dict[str, str]:
        return {BEST_TRIAL_TAG: self.best_trial} if self.best_trial else {}


# ---------------------------------------------------------------- files and the parent run

def write_outputs(rep, out_dir) -> list:
    """The report's files in `out_dir`, each written atomically."""
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, writer in rep.files().items():
        write_atomic(out / name, lambda tmp, w=writer: w(Path(tmp)))
        paths.append(out / name)
    return paths


def html_location(uri: str, parent_run_id: str) -> Optional[str]:
    """Where the parent run's report/report.html is: a local path for a file store (open it in a
    browser), else the artifact URI (the MLflow UI shows it under the run's artifacts)."""
    client = tracking.client(uri)
    try:
        names = {Path(a.path).name for a in client.list_artifacts(parent_run_id, "report")}
        base = client.get_run(parent_run_id).info.artifact_uri
    except Exception:  # not logged (the server was away): `paceray report --out` writes it later
        return None
    if "report.html" not in names:
        return None
    location = f"{base.rstrip('/')}/report/report.html"
    return location.removeprefix("file://") if location.startswith("file://") else location


def log_to_parent(uri: str, parent_run_id: str):
    """Compute the report of one search and log it to its parent run: files under `report/`, the
    report's tags on the parent."""
    rep = report_for_parent(uri, parent_run_id)
    client = tracking.client(uri)
    with tempfile.TemporaryDirectory(prefix="paceray-report-") as tmp:
        write_outputs(rep, tmp)
        Path(tmp, "report.txt").write_text(rep.text + "\n")
        client.log_artifacts(parent_run_id, tmp, "report")
    for key, value in rep.parent_tags().items():
        client.set_tag(parent_run_id, key, value)
    return rep
