"""`paceray train SPEC`: one trial (base config + --set) through Ray Train, no Tune."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from paceray.base import locks as command_lock
from paceray.base.atomic import read_state, write_text_atomic
from paceray.base.dotted import flatten
from paceray.base.errors import PacerayError
from paceray.base.paths import RunDir, storage_root
from paceray.cluster import connect as raycluster
from paceray.protocol import CheckpointFallback, keys
from paceray.spec.invocation import Invocation
from paceray.spec.specfile import LoadedSpec, load, parse_overrides
from paceray.tracking import server as mlflow_server
from paceray.trial.prepare import check_same_store, prepare_assets, readable_store, resume_point
from paceray.trial.runner import FitPlan, Outcome, RunRequest, TrialRunner


def run_train(asked: Invocation) -> None:
    # Order matters: everything that can fail on bad input (spec, dataset, Ray address, tracking
    # server, checkpoint) fails before an MLflow run or anything under the run directory exists.
    loaded = load(asked.spec_path, parse_overrides(asked.overrides))
    spec = loaded.spec
    rd = RunDir(asked.run_dir_or(loaded.run_dir))
    pointer = rd.train_pointer(spec.name)
    previous, fallback = None, None
    if asked.resume:
        if not pointer.exists():
            raise PacerayError(f"--resume: no earlier `paceray train` of {spec.name!r} under {rd.root} "
                               f"({pointer} is missing)")
        previous = read_state(pointer, f"remove {pointer.parent} to start a new run (without --resume)")
        fallback = resume_point(loaded, rd.trial_results(previous["trial_id"]))
    storage = storage_root()
    external = mlflow_server.external_uri(asked.tracking_uri or spec.tracking.uri)
    if external:
        mlflow_server.check_reachable(external)
    prepare_assets(loaded, storage, readable_store(external, rd.root))
    if previous:
        check_resume(loaded, previous, external, pointer)
    raycluster.check_address(asked.address)
    session = _Session(loaded, rd, storage, external, previous, fallback)
    # One command per run, before it starts Ray: a second `--resume` would train the same run twice.
    with command_lock.held(pointer.parent, f"`paceray train` of {spec.name!r} under {rd.root}"):
        result, trial_id = _locked(session, asked.address)
    _say_best(loaded, result, rd, trial_id)
    if external is None:
        print(f"MLflow UI: {mlflow_server.ui_command(rd.root)}")


@dataclass(frozen=True)
class _Session:
    """One `paceray train`, checked: its spec, run directory, storage root, the tracking server it
    names (None: the embedded store), the run it resumes (its pointer) and the checkpoint it
    resumes from when Ray's latest does not load."""

    loaded: LoadedSpec
    rd: RunDir
    storage: Path
    external: Optional[str]
    previous: Optional[dict]
    fallback: Optional[CheckpointFallback]


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


def _locked(s: _Session, address: Optional[str]):
    spec = s.loaded.spec
    where = raycluster.connect(address)
    try:
        raycluster.check_tracking_reach(s.external)
        with mlflow_server.tracking_session(s.rd.root, s.external) as uri:
            print(f"paceray train {spec.name}: {where}; MLflow at {uri}", flush=True)
            if s.previous:
                trial_id = s.previous["trial_id"]
                runner = TrialRunner.resume(trial_id, uri, s.previous["run_id"], s.rd.root)
            else:
                trial_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
                runner = TrialRunner.open(trial_id, RunRequest(
                    uri, spec.experiment, trial_id, identity={},
                    tags={keys.TRIAL_TAG: trial_id, keys.KIND_TAG: "trial", keys.TRAINABLE_TAG: spec.trainable,
                          keys.METRIC_TAG: s.loaded.metric, keys.MODE_TAG: s.loaded.mode},
                    params=flatten(s.loaded.base), run_dir=s.rd.root))
                write_text_atomic(s.rd.train_pointer(spec.name), json.dumps(
                    {"trial_id": trial_id, "run_id": runner.run.run_id, "experiment": spec.experiment,
                     "tracking_uri": s.external, "config": s.loaded.base}, default=str))
            result = _fit(s, runner)
    finally:
        raycluster.shutdown()
    return result, trial_id


def _fit(s: _Session, runner: TrialRunner):
    trial_id = runner.trial_id
    plan = FitPlan(s.loaded.trainable, s.loaded.base, s.loaded.spec.resources, s.rd.ray_results, trial_id,
                   context=dict(tracking_uri=runner.run.uri, storage=str(s.storage), run_dir=str(s.rd.root),
                                metric=s.loaded.metric, mode=s.loaded.mode, fallback=s.fallback),
                   mode=s.loaded.mode)
    ending = runner.fit(plan)
    runner.end(ending)  # a crash too: the run must not stay RUNNING
    if ending.error is not None:  # Ray wraps the worker's error
        e = ending.error
        why = ending.reason if ending.outcome is Outcome.NOT_PLACED else str(e).splitlines()[0][:300]
        raise PacerayError(f"trial {trial_id} failed: {why} "
                           f"(details: {s.rd.trial_results(trial_id)}; resume with --resume)") from e
    if ending.outcome is not Outcome.FINISHED:  # the trainable ended the trial as failed, in-band, and said why
        raise PacerayError(f"trial {trial_id} failed: {ending.reason}")
    return ending.result


def _say_best(loaded, result, rd: RunDir, trial_id: str) -> None:
    metric, better = loaded.metric, (min if loaded.mode == "min" else max)
    scored = [m for _, m in (result.best_checkpoints or []) if m.get(metric) is not None]
    print(f"\nresults: {rd.trial_results(trial_id)}")
    if scored:
        best = better(scored, key=lambda m: m[metric])
        print(f"best {metric} {best[metric]:.4g} at step {best.get('step')}")
