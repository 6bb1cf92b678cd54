"""`paceray train SPEC`: one trial (base config + --set) through Ray Train, no Tune."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from paceray.base import locks as command_lock
from paceray.base.atomic import read_state, write_text_atomic
from paceray.base.dotted import flatten
from paceray.base.errors import PacerayError
from paceray.base.paths import storage_root
from paceray.cluster import connect as raycluster
from paceray.cluster.placement import placement_failure, placement_tags
from paceray.protocol import CheckpointFallback, TrialContext, failure_of, keys
from paceray.spec.specfile import load, parse_overrides
from paceray.tracking import server as mlflow_server
from paceray.tracking import runlog
from paceray.tracking.run import Run
from paceray.trial.prepare import check_same_store, prepare_assets, readable_store, resume_point
from paceray.trial.trainer import trainer_for, trial_storage


def _pointer(run_dir: Path, name: str) -> Path:
    return run_dir / "train" / name / "latest.json"


def run_train(spec_path: str, overrides, address: Optional[str], tracking_uri: Optional[str], resume: bool,
              run_dir: Optional[str]) -> None:
    # Order matters: everything that can fail on bad input (spec, dataset, Ray address, tracking
    # server, checkpoint) fails before an MLflow run or anything under the run directory exists.
    loaded = load(spec_path, parse_overrides(overrides))
    spec = loaded.spec
    rd = Path(run_dir).expanduser().resolve() if run_dir else loaded.run_dir
    tracking_uri = tracking_uri or spec.tracking.uri
    pointer = _pointer(rd, spec.name)
    previous, fallback = None, None
    if resume:
        if not pointer.exists():
            raise PacerayError(f"--resume: no earlier `paceray train` of {spec.name!r} under {rd} ({pointer} is missing)")
        previous = read_state(pointer, f"remove {pointer.parent} to start a new run (without --resume)")
        fallback = resume_point(loaded, trial_storage(rd) / previous["trial_id"])
    storage = storage_root()
    external = mlflow_server.external_uri(tracking_uri)
    if external:
        mlflow_server.check_reachable(external)
    prepare_assets(loaded, storage, readable_store(external, rd))
    if previous:
        check_resume(loaded, previous, external, pointer)
    raycluster.check_address(address)
    # One command per run, before it starts Ray: a second `--resume` would train the same run twice.
    with command_lock.held(pointer.parent, f"`paceray train` of {spec.name!r} under {rd}"):
        result, trial_id = _locked(loaded, rd, storage, external, previous, pointer, address, fallback)
    _say_best(loaded, result, rd, trial_id)
    if external is None:
        print(f"MLflow UI: {mlflow_server.ui_command(rd)}")


def check_resume(loaded, previous: dict, external: Optional[str], pointer: Path) -> None:
    """A resume goes to the run it continues, with a config its checkpoint can follow; anything
    else is one line before the run is touched. (Pointers written before these were recorded
    are not checked.)"""
    check_same_store(previous, external, f"run {previous['run_id']}", pointer, ", or start a new run without --resume")
    fixed = tuple(loaded.trainable.resume_fixed)
    if not fixed or "config" not in previous:
        return
    before, now = flatten(previous["config"]), flatten(json.loads(json.dumps(loaded.base, default=str)))
    changed = [k for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k) and any(k == f or k.startswith(f + ".") for f in fixed)]
    if changed:
        what = ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        raise PacerayError(f"--resume: {what} since run {previous['run_id']} started ({pointer}); its checkpoints "
                           f"cannot follow that change: drop the --set, or start a new run without --resume")


def _locked(loaded, rd: Path, storage: Path, external: Optional[str], previous: Optional[dict], pointer: Path,
            address: Optional[str], fallback: Optional[CheckpointFallback]):
    spec = loaded.spec
    where = raycluster.connect(address)
    try:
        raycluster.check_tracking_reach(external)
        with mlflow_server.tracking_session(rd, external) as uri:
            print(f"paceray train {spec.name}: {where}; MLflow at {uri}", flush=True)
            if previous:
                trial_id = previous["trial_id"]
                run = Run(uri, previous["run_id"], rd)
                run.resume()
            else:
                trial_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
                run = Run.create(uri, spec.experiment, trial_id,
                                 {keys.TRIAL_TAG: trial_id, keys.KIND_TAG: "trial",
                                  keys.TRAINABLE_TAG: spec.trainable, keys.METRIC_TAG: loaded.metric,
                                  keys.MODE_TAG: loaded.mode}, rd, flatten(loaded.base))
                write_text_atomic(pointer, json.dumps({"trial_id": trial_id, "run_id": run.run_id,
                                                       "experiment": spec.experiment, "tracking_uri": external,
                                                       "config": loaded.base}, default=str))
            result = _fit(loaded, rd, storage, run, trial_id, fallback)
    finally:
        raycluster.shutdown()
    return result, trial_id


def _fit(loaded, rd: Path, storage: Path, run: Run, trial_id: str, fallback: Optional[CheckpointFallback]):
    context = TrialContext(trial_id=trial_id, run_id=run.run_id, tracking_uri=run.uri, storage=str(storage),
                           run_dir=str(rd), metric=loaded.metric, fallback=fallback,
                           open_run_log=runlog.open_for_trial)
    trainer = trainer_for(loaded.trainable, loaded.base, context, loaded.spec.resources, trial_storage(rd),
                          name=trial_id, mode=loaded.mode)
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the worker's error; the run must not stay RUNNING
        why = placement_failure(e, loaded.spec.resources)
        run.end_and_say("FAILED", why or str(e))
        raise PacerayError(f"trial {trial_id} failed: {why or str(e).splitlines()[0][:300]} "
                           f"(details: {trial_storage(rd) / trial_id}; resume with --resume)") from e
    reason = failure_of(result)
    if reason:  # the trainable ended the trial as failed, in-band, and said why
        run.end_and_say("FAILED", reason)
        raise PacerayError(f"trial {trial_id} failed: {reason}")
    run.end_and_say("FINISHED", tags=placement_tags(result))
    return result


def _say_best(loaded, result, rd: Path, trial_id: str) -> None:
    metric, better = loaded.metric, (min if loaded.mode == "min" else max)
    scored = [m for _, m in (result.best_checkpoints or []) if m.get(metric) is not None]
    print(f"\nresults: {trial_storage(rd) / trial_id}")
    if scored:
        best = better(scored, key=lambda m: m[metric])
        print(f"best {metric} {best[metric]:.4g} at step {best.get('step')}")
