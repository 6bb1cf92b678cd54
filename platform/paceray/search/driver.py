"""`paceray tune SPEC`: a search. One MLflow parent run per search, a child per trial."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import yaml

from paceray.base import locks as command_lock
from paceray.base.atomic import read_state, write_text_atomic
from paceray.base.errors import PacerayError
from paceray.base.paths import storage_root
from paceray.cluster import connect as raycluster
from paceray.protocol import STEP_KEY, keys
from paceray.search import live_view as progress
from paceray.search import tuner as tuning
from paceray.search.trial_fn import search_context
from paceray.spec.specfile import load, parse_overrides
from paceray.tracking import client as tracking
from paceray.tracking import server as mlflow_server
from paceray.tracking.run import Run
from paceray.trial.prepare import check_same_store, prepare_assets, readable_store


def _state_file(run_dir: Path, name: str) -> Path:
    return run_dir / "searches" / name / "search.json"


def run_tune(spec_path: str, overrides, address: Optional[str], tracking_uri: Optional[str], resume: bool,
             run_dir: Optional[str], verbose: bool = False) -> None:
    loaded = load(spec_path, parse_overrides(overrides))
    spec = loaded.spec
    rd = Path(run_dir).expanduser().resolve() if run_dir else loaded.run_dir
    tracking_uri = tracking_uri or spec.tracking.uri
    state_path = _state_file(rd, spec.name)
    tuner_dir = rd / "ray" / spec.name
    previous = None
    if resume:
        if not state_path.exists() or not tuner_dir.exists():
            raise PacerayError(f"--resume: no interrupted search {spec.name!r} under {rd} ({state_path} is missing)")
        previous = read_state(state_path, f"remove {state_path.parent} and {tuner_dir} to start the search over")
    storage = storage_root()
    # Everything that can fail on bad input fails before an MLflow run or a results folder exists.
    external = mlflow_server.external_uri(tracking_uri)
    if previous:
        check_same_store(previous, external, f"search {spec.name!r}", state_path)
    if external:
        mlflow_server.check_reachable(external)
    prepare_assets(loaded, storage, readable_store(external, rd))
    raycluster.check_address(address)
    # One command per search, before it starts Ray: a second one would rename this one's tuner
    # folder under it and mix their trials.
    lock = ExitStack()
    lock.enter_context(command_lock.held(state_path.parent, f"the search {spec.name!r} under {rd}"))
    try:
        where = raycluster.connect(address)
        raycluster.check_tracking_reach(external)
        # A trial that cannot fit the cluster fails here, before anything is written.
        capacity, source = raycluster.cluster_capacity(loaded.spec.resources.max_cluster)
        concurrent = tuning.max_concurrent(loaded, capacity, source)
        if source != raycluster.PRESENT:
            print(f"paceray: up to {concurrent} trial(s) at once: the cluster can grow to "
                  f"{raycluster.describe_resources(capacity)} ({source})", flush=True)
        worker_log = None if verbose else _divert_worker_logs(state_path.parent / "workers.log")
        if not previous and tuner_dir.exists():
            # A new search must not silently mix with the old one's trials and checkpoints.
            tuner_dir.rename(tuner_dir.with_name(f"{spec.name}.{time.strftime('%Y%m%d-%H%M%S')}"))
        with mlflow_server.tracking_session(rd, external) as uri:
            if previous:
                parent = Run(uri, previous["parent_run_id"], rd)
                parent.resume()
            else:
                parent = Run.create(uri, spec.experiment, f"search-{spec.name}",
                                    {keys.KIND_TAG: "search", keys.SPEC_TAG: spec.path or "",
                                     keys.TRAINABLE_TAG: spec.trainable, keys.METRIC_TAG: loaded.metric,
                                     keys.MODE_TAG: loaded.mode}, rd, _search_params(loaded))
                start = _Wait(uri, "start")
                _unless_away(start, "logging the spec", _log_spec, uri, parent.run_id, loaded)
                _unless_away(start, "saving the UI view", _save_comparison, uri, parent.run_id, loaded, False)
                write_text_atomic(state_path, json.dumps({"parent_run_id": parent.run_id, "experiment": spec.experiment,
                                                          "spec": spec.path, "tracking_uri": external}))
            context = search_context(loaded, uri, parent.run_id, str(storage), rd,
                                            mlflow_server.client_env(embedded=external is None))
            tuner, total = tuning.build_tuner(loaded, context, concurrent, tuner_dir if previous else None)
            print(f"paceray tune {spec.name}: {where}; MLflow at {uri}; results in {tuner_dir}", flush=True)
            status = "FAILED"
            t = loaded.trainable
            view = progress.SearchView(spec.name, total, [("step", STEP_KEY), *(t.progress or [(loaded.metric,) * 2])],
                                       loaded.metric, loaded.mode, lambda config: t.horizon(config).steps,
                                       t.run_name, worker_log, live=False if verbose else None)
            end = _Wait(uri, "end")
            try:
                with view:
                    results = tuner.fit()
                status = "FINISHED"  # failed trials are marked on their own runs
                _unless_away(end, "marking the trials a scheduler stopped", _mark_stopped_trials, uri,
                             spec.experiment, parent.run_id, results, spec.tune.scheduler, rd, loaded.trainable.horizon)
            finally:
                _unless_away(end, "closing unfinished trials' runs", _close_orphans, uri, spec.experiment,
                             parent.run_id, rd)
                end.server_back()  # else the parent's end waits on disk for a replay
                # Queued if the server went away since: delivered below, once the report's wait
                # has seen it back; said now only if the search is failing.
                left = parent.end(status)
                if status != "FINISHED":
                    parent.say_waiting(left)
            if not _unless_away(end, "the report", _finish, uri, parent.run_id, loaded, results):
                print(f"the search's report waits for MLflow: `paceray report {spec.experiment}` writes it later "
                      f"(the trials' queued writes first: the replay commands above)", flush=True)
            if left and not (end.server_back() and parent.deliver_leftovers()):
                parent.say_waiting(left)
            comparison = _comparison_url(uri, parent.run_id, uri if external else mlflow_server.ui_base())
    finally:
        lock.close()
        raycluster.shutdown()
    if external is None:
        print(f"MLflow UI: `{mlflow_server.ui_command(rd)}`" + (f", then open {comparison}" if comparison else ""))
    elif comparison:
        print(f"the trials compared in MLflow's UI: {comparison}")
    failed = [r for r in results if r.error is not None]
    if failed:
        # The search went on past them, and its report is written; the exit code still says so.
        raise PacerayError(f"{len(failed)} of {len(results)} trial(s) failed (see the report above for why)")


def _divert_worker_logs(path: Path) -> Path:
    """Ray's worker output into `path` (appended: a resumed search's lines follow the first's)."""
    from paceray.cluster.ray_internals import divert_worker_logs

    path.parent.mkdir(parents=True, exist_ok=True)
    sink = open(path, "a", buffering=1)
    sink.write(f"--- paceray tune, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    divert_worker_logs(sink)
    return path


def _save_comparison(uri: str, parent: str, loaded, with_metrics: bool) -> None:
    """The search's view in MLflow's UI (paceray.ui_view); at the end, with every metric its
    trials logged, so that the UI adds no chart of its own for them."""
    from paceray.tracking import ui_view

    c = tracking.client(uri)
    experiment_id = c.get_run(parent).info.experiment_id
    logged: set[str] = set()
    if with_metrics:
        for run in c.search_runs([experiment_id], filter_string=f"tags.`{keys.PARENT_TAG}` = '{parent}'"):
            logged.update(run.data.metrics)
    ui_view.save_comparison(c, experiment_id, parent, loaded.spec.name, loaded.metric, loaded.mode,
                            loaded.search.keys(), logged)


def _comparison_url(uri: str, parent: str, base: str) -> Optional[str]:
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


WAIT_ENV = "PACERAY_DRIVER_WAIT"  # s the driver waits for an MLflow server that went away, per phase
WAIT = 300.0


class _Wait:
    """One bounded wait for the tracking server in a phase of the search (its start, its end),
    shared by that phase's steps: an outage costs a step only if it outlasts the wait."""

    def __init__(self, uri: str, phase: str):
        self.uri, self.phase = uri, phase
        self.deadline: Optional[float] = None

    def server_back(self) -> bool:
        if mlflow_server.answers(self.uri):
            return True
        if self.deadline is None:
            wait = float(os.environ.get(WAIT_ENV, WAIT))
            self.deadline = time.monotonic() + wait
            print(f"paceray: MLflow at {self.uri} is unreachable at the {self.phase} of the search; waiting up to "
                  f"{wait:.0f} s ({WAIT_ENV}) for it", file=sys.stderr, flush=True)
        while time.monotonic() < self.deadline:
            time.sleep(2.0)
            if mlflow_server.answers(self.uri):
                return True
        return False


def _unless_away(wait: _Wait, what: str, fn, *args) -> bool:
    """Run one of the driver's MLflow steps; if the server is away and does not come back within
    the phase's wait, say what waits and go on (the trials' own writes and every run's end are
    queued on disk). True if it ran. Any other error is raised. A probe first: each MLflow call
    on a server that is gone waits out MLflow's retries (seconds each) before it fails."""
    def skipped(e: str) -> bool:
        print(f"warning: MLflow at {wait.uri} is unreachable; skipped {what} ({e})", file=sys.stderr, flush=True)
        return False

    for attempt in range(2):  # a server that goes away mid-step gets the wait once more
        if not wait.server_back():
            return skipped("no answer")
        try:
            fn(*args)
            return True
        except Exception as e:
            if mlflow_server.answers(wait.uri):
                raise
            if attempt == 1:
                return skipped(type(e).__name__)
    return False


def _search_params(loaded) -> dict:
    t, r = loaded.spec.tune, loaded.spec.resources
    params = {f"search.{k}": f"{d.kind}{list(d.args)}" for k, d in loaded.search.items()}
    params.update({f"tune.{k}": v for k, v in t.model_dump().items()})
    params.update({f"resources.{k}": v for k, v in r.model_dump().items()})
    params["trainable"] = loaded.spec.trainable
    return params


def _log_spec(uri: str, parent: str, loaded) -> None:
    c = tracking.client(uri)
    c.log_text(parent, Path(loaded.spec.path).read_text() if loaded.spec.path else "", "spec/spec.yaml")
    resolved = {"base": loaded.base, "search": {k: {d.kind: list(d.args)} for k, d in loaded.search.items()},
                "overrides": loaded.overrides}
    c.log_text(parent, yaml.safe_dump(resolved, sort_keys=False), "spec/resolved.yaml")


def _mark_stopped_trials(uri: str, experiment: str, parent: str, results, scheduler: str, run_dir: Path,
                         horizon) -> None:
    """A trial Tune ended without error before its last step was stopped by the scheduler: its run
    becomes KILLED, tagged with who stopped it, so no one reads it as a crash or a finished trial.
    Tune's result decides, not the run's status: depending on how fast the trial's process went
    down, the stop left the run RUNNING or (its Train controller dying first) FAILED."""
    for result in results:
        tid = (result.metrics or {}).get("trial_id")  # Tune adds it to every result a trial reports
        if tid is None or result.error is not None:
            continue
        run = Run.find(uri, experiment, {keys.TRIAL_TAG: tid, keys.PARENT_TAG: parent}, run_dir)
        if run is None:
            continue
        run.deliver_leftovers()  # what the stopped process had queued
        if result.config is None or (result.metrics or {}).get(STEP_KEY, -1) >= horizon(result.config).steps:
            if run.status == "RUNNING":
                run.end_and_say("FINISHED")  # stopped only after its last report
            continue
        run.kill(scheduler)


def _close_orphans(uri: str, experiment: str, parent: str, run_dir: Path) -> None:
    """Child runs still RUNNING when the search ends (a trial killed with its driver) are marked
    failed, after what their processes had queued is delivered."""
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return
    for found in c.search_runs([exp.experiment_id], filter_string=f"tags.`{keys.PARENT_TAG}` = '{parent}' "
                                                                   f"and attributes.status = 'RUNNING'"):
        Run(uri, found.info.run_id, run_dir).end_and_say(
            "FAILED", "the trial did not finish (search interrupted or killed)")


def _finish(uri: str, parent: str, loaded, results) -> None:
    """The parent run gets the report (the trainable's, through its hook), the best trial's config
    and its exported model."""
    from paceray.report import search as report

    summary = report.log_to_parent(uri, parent)
    _save_comparison(uri, parent, loaded, with_metrics=True)
    try:
        best = results.get_best_result(metric=loaded.metric, mode=loaded.mode, scope="all", filter_nan_and_inf=True)
    except RuntimeError:  # no trial reported the metric
        best = None
    if best is not None and best.config is not None:
        c = tracking.client(uri)
        c.log_dict(parent, best.config, "best/config.json")
        export = loaded.trainable.export
        ckpt, value = _best_checkpoint(best, loaded.metric, loaded.mode)
        if export is not None and ckpt is not None:
            with tempfile.TemporaryDirectory() as tmp:
                export(ckpt, best.config, str(Path(tmp) / "pipeline"))
                c.log_artifacts(parent, str(Path(tmp) / "pipeline"), "best/pipeline")
            c.set_tag(parent, keys.BEST_CHECKPOINT_TAG, ckpt)
            from paceray.tracking.model_registry import register_best

            version = register_best(c, parent, loaded.spec.name, "best/pipeline",
                                    {keys.TRIAL_TAG: (best.metrics or {}).get("trial_id", ""), loaded.metric: value})
            if version:
                print(f"best model registered: models:/{version}", flush=True)
    print()
    print(summary.text)
    where = report.html_location(uri, parent)
    if where:
        print(f"\nthe report as one page: {where}")


def _best_checkpoint(result, metric: str, mode: str) -> tuple[Optional[str], Optional[float]]:
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
