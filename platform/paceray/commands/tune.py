"""`paceray tune SPEC`: a curriculum search. One MLflow parent run per search, a child per trial."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Optional

import yaml

from paceray import raycluster, tracking, tuning
from paceray.atomic import write_text_atomic
from paceray.commands.train import prepare_assets
from paceray.errors import PacerayError
from paceray.paths import storage_root
from paceray.spec import load, load_trainable, parse_overrides


def _state_file(run_dir: Path, name: str) -> Path:
    return run_dir / "searches" / name / "search.json"


def run_tune(spec_path: str, overrides, address: Optional[str], tracking_uri: Optional[str], resume: bool,
             run_dir: Optional[str]) -> None:
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
        previous = json.loads(state_path.read_text())
    trainable = load_trainable(spec.trainable, str(spec.path))
    storage = storage_root()
    # Everything that can fail on bad input fails before an MLflow run or a results folder exists.
    prepare_assets(trainable, loaded.base, storage, str(spec.path))
    external = tracking.external_uri(tracking_uri)
    if external:
        tracking.check_reachable(external)
    where = raycluster.connect(address)
    try:
        # A trial that cannot fit the cluster fails here, before anything is written.
        concurrent = tuning.max_concurrent(loaded, raycluster.cluster_resources())
        if not previous and tuner_dir.exists():
            # A new search must not silently mix with the old one's trials and checkpoints.
            tuner_dir.rename(tuner_dir.with_name(f"{spec.name}.{time.strftime('%Y%m%d-%H%M%S')}"))
        with tracking.tracking_session(rd, external) as uri:
            if previous:
                parent = previous["parent_run_id"]
                tracking.client(uri).update_run(parent, status="RUNNING")
            else:
                parent = tracking.create_run(uri, spec.experiment, f"search-{spec.name}",
                                             {tracking.KIND_TAG: "search", "paceray.spec": spec.path or ""},
                                             _search_params(loaded))
                _log_spec(uri, parent, loaded)
                write_text_atomic(state_path, json.dumps({"parent_run_id": parent, "experiment": spec.experiment,
                                                             "spec": spec.path}))
            context = tuning.search_context(loaded, uri, parent, str(storage), rd,
                                            tracking.client_env(embedded=external is None))
            tuner = tuning.build_tuner(loaded, context, concurrent, tuner_dir if previous else None)
            print(f"paceray tune {spec.name}: {where}; MLflow at {uri}; results in {tuner_dir}", flush=True)
            status = "FAILED"
            try:
                results = tuner.fit()
                status = "FINISHED"  # failed trials are marked on their own runs
                _mark_stopped_trials(uri, spec.experiment, parent, results, spec.tune.scheduler, rd)
            finally:
                _close_orphans(uri, spec.experiment, parent, rd)
                tracking.end_run(uri, parent, status)
            _finish(uri, parent, loaded, rd, results, trainable)
    finally:
        raycluster.shutdown()
    if external is None:
        print(f"MLflow UI: {tracking.ui_command(rd)}")


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


def _trial_id(result) -> Optional[str]:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return tid
    name = Path(result.path).name if result.path else ""  # run_trial_<id>_<params>_<date>
    parts = name.split("_")
    return "_".join(parts[2:4]) if len(parts) >= 4 else None


def _mark_stopped_trials(uri: str, experiment: str, parent: str, results, scheduler: str, run_dir: Path) -> None:
    """A trial Tune ended without error before its last step was stopped by the scheduler: its run
    becomes KILLED, tagged with who stopped it, so no one reads it as a crash or a finished
    curriculum. Tune's result decides, not the run's status: depending on how fast the trial's
    process went down, the stop left the run RUNNING or (its Train controller dying first) FAILED."""
    c = tracking.client(uri)
    for result in results:
        tid = _trial_id(result)
        if tid is None or result.error is not None:
            continue
        run_id = tracking.find_run(uri, experiment, {tracking.TRIAL_TAG: tid, tracking.PARENT_TAG: parent})
        if run_id is None:
            continue
        tracking.deliver_leftovers(uri, run_id, run_dir)  # what the stopped process had queued
        run = c.get_run(run_id)
        steps = (result.config or {}).get("train", {}).get("steps")
        if steps is None or (result.metrics or {}).get("step", -1) >= steps:
            if run.info.status == "RUNNING":
                tracking.finish_run(uri, run_id, "FINISHED", run_dir)  # stopped only after its last report
            continue
        if tracking.ERROR_TAG in run.data.tags:
            c.delete_tag(run_id, tracking.ERROR_TAG)
        c.set_tag(run_id, "paceray.stopped_early", scheduler)
        tracking.finish_run(uri, run_id, "KILLED", run_dir)


def _close_orphans(uri: str, experiment: str, parent: str, run_dir: Path) -> None:
    """Child runs still RUNNING when the search ends (a trial killed with its driver) are marked
    failed, after what their processes had queued is delivered."""
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return
    for run in c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent}' "
                                                                 f"and attributes.status = 'RUNNING'"):
        tracking.deliver_leftovers(uri, run.info.run_id, run_dir)
        c.set_tag(run.info.run_id, tracking.ERROR_TAG, "the trial did not finish (search interrupted or killed)")
        tracking.finish_run(uri, run.info.run_id, "FAILED", run_dir)


def _finish(uri: str, parent: str, loaded, run_dir: Path, results, trainable) -> None:
    """The parent run gets the trial table and plots, the best trial's config and its model."""
    from paceray import report

    summary = report.log_to_parent(uri, parent)
    t = loaded.spec.tune
    try:
        best = results.get_best_result(metric=t.metric, mode=t.mode, scope="all", filter_nan_and_inf=True)
    except RuntimeError:  # no trial reported the metric
        best = None
    if best is not None and best.config is not None:
        c = tracking.client(uri)
        c.log_dict(parent, best.config, "best/config.json")
        export = getattr(trainable, "export", None)
        ckpt = _best_checkpoint(best, t.metric, t.mode)
        if export is not None and ckpt is not None:
            with tempfile.TemporaryDirectory() as tmp:
                export(ckpt, best.config, str(Path(tmp) / "pipeline"))
                c.log_artifacts(parent, str(Path(tmp) / "pipeline"), "best/pipeline")
            c.set_tag(parent, "paceray.best_checkpoint", ckpt)
    print()
    print(summary.text)


def _best_checkpoint(result, metric: str, mode: str) -> Optional[str]:
    """The checkpoint of the trial's best report: TuneReportCallback forwards each checkpoint's
    path as the `checkpoint_path` metric, and Ray keeps the best K by eval/fid."""
    df = result.metrics_dataframe
    if df is None or metric not in df or "checkpoint_path" not in df:
        return None
    df = df.dropna(subset=[metric, "checkpoint_path"])
    if df.empty:
        return None
    row = df.loc[df[metric].idxmin() if mode == "min" else df[metric].idxmax()]
    path = str(row["checkpoint_path"])
    return path if Path(path).exists() else None
