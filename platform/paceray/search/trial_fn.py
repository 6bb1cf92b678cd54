"""The function each Tune trial runs: its MLflow child run (found by the trial id before one is
created, so a restarted trial or a resumed search never makes a second run) and one TorchTrainer
fit; `TuneReportCallback` forwards rank 0's reports to Tune."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from paceray.base.dotted import flatten
from paceray.base.errors import PacerayError
from paceray.cluster.placement import placement_failure, placement_tags
from paceray.cluster.ray_internals import tune_stop_flag
from paceray.protocol import TrialContext, failure_of, keys
from paceray.spec import registry
from paceray.spec.specfile import LoadedSpec, ResourcesSection
from paceray.tracking import client as tracking
from paceray.tracking import runlog
from paceray.tracking.run import Run
from paceray.tracking.server import apply_client_env
from paceray.trial.trainer import resume_point, trainer_for, trial_storage


@dataclass(frozen=True)
class SearchContext:
    """What every Tune trial of one search is told, beside its config (through
    `tune.with_parameters`, so a restored search gives it afresh: the embedded MLflow server of
    the new process listens on a new port)."""

    trainable: str  # the spec's reference, resolved again in each trial's process
    name: str
    experiment: str
    tracking_uri: str
    parent_run_id: str
    storage: str
    run_dir: str
    resources: dict  # ResourcesSection, as a dict
    metric: str
    mode: str
    client_env: dict
    console_progress: bool = True


def search_context(loaded: LoadedSpec, uri: str, parent_run_id: str, storage: str, run_dir: Path,
                   client_env: dict[str, str]) -> SearchContext:
    return SearchContext(trainable=loaded.spec.trainable, name=loaded.spec.name, experiment=loaded.spec.experiment,
                         tracking_uri=uri, parent_run_id=parent_run_id, storage=storage, run_dir=str(run_dir),
                         resources=loaded.spec.resources.model_dump(), metric=loaded.metric, mode=loaded.mode,
                         client_env=client_env)


def run_trial(config: dict, search: SearchContext) -> None:
    """The Tune function trainable: one MLflow child run, one TorchTrainer fit."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    apply_client_env(search.client_env)  # this process was started before the command set it
    trainable = registry.resolve(search.trainable)
    run_dir = Path(search.run_dir)
    identity = {keys.TRIAL_TAG: trial_id, keys.PARENT_TAG: search.parent_run_id}
    run, already_finished = _trial_run(search, trainable.run_name(config, trial_id), identity, flatten(config))
    trials_dir, name = trial_storage(run_dir) / search.name / "trials", f"trial-{trial_id}"
    try:  # a resumed search's trial: the same check as `paceray train --resume`
        fallback = resume_point(trials_dir / name, trainable.check_checkpoint)
    except PacerayError as e:
        run.end_and_say("FAILED", str(e))
        raise TrialFailed(str(e)) from None
    if fallback is not None:
        print(f"paceray: trial {trial_id}: {fallback.message()}", flush=True)
    context = TrialContext(trial_id=trial_id, run_id=run.run_id, tracking_uri=search.tracking_uri,
                           storage=search.storage, run_dir=search.run_dir, metric=search.metric,
                           console_progress=search.console_progress, fallback=fallback,
                           open_run_log=runlog.open_for_trial)
    trainer = trainer_for(trainable, config, context, ResourcesSection(**search.resources), trials_dir, name=name,
                          mode=search.mode, callbacks=[TuneReportCallback()])
    stop_flag = tune_stop_flag()
    try:
        result = trainer.fit()
    except Exception as e:
        if stop_flag is not None and stop_flag.is_set():
            # Tune stopped this trial (a scheduler's decision) and its Train controller died with
            # it: not a failure. The search driver marks the run KILLED from Tune's own result.
            raise
        run.end_and_say("FAILED", placement_failure(e, ResourcesSection(**search.resources)) or str(e))
        raise
    reason = failure_of(result)
    if reason:  # the trainable ended its trial as failed, in-band (e.g. a NaN loss): Tune sees an error
        run.end_and_say("FAILED", reason)
        raise TrialFailed(reason)
    if not already_finished:
        run.end_and_say("FINISHED", tags=placement_tags(result))


RUN_START_TIMEOUT_ENV = "PACERAY_RUN_START_TIMEOUT"  # s a trial waits for MLflow to give it its run
RUN_START_TIMEOUT = 900.0


def _trial_run(search: SearchContext, name: str, identity: dict, params: dict) -> tuple[Run, bool]:
    """The trial's MLflow run, found by its identity (a restarted trial, a resumed search) or
    created; (run, whether it had already finished). While the server is away the trial waits,
    up to PACERAY_RUN_START_TIMEOUT seconds, and trains only once it has its run: its writes
    need a run id to queue under. A retry finds a run created just before the outage by its
    identity tags and logs its parameters again (the same values: MLflow accepts that)."""
    import time

    from paceray.tracking.server import answers

    uri, run_dir = search.tracking_uri, Path(search.run_dir)
    timeout = float(os.environ.get(RUN_START_TIMEOUT_ENV, RUN_START_TIMEOUT))
    deadline, said = time.monotonic() + timeout, False
    while True:
        try:
            run = Run.find(uri, search.experiment, identity, run_dir)
            # A trial whose run finished just before the search was killed (Tune had not
            # recorded it yet) is re-run by the restore: its TorchTrainer only re-reports the
            # final result, and its run stays as it was.
            if run is not None:
                finished = run.resume()
                if not finished:
                    tracking.log_params(uri, run.run_id, params)
                return run, finished
            run = Run.create(uri, search.experiment, name, {**identity, keys.KIND_TAG: "trial",
                                                            keys.TRAINABLE_TAG: search.trainable}, run_dir)
            tracking.log_params(uri, run.run_id, params)
            return run, False
        except Exception as e:
            if answers(uri):
                raise
            if time.monotonic() > deadline:
                raise TrialFailed(f"MLflow at {uri} stayed unreachable for {timeout:.0f} s ({RUN_START_TIMEOUT_ENV}): "
                                  f"the trial could not get its run ({type(e).__name__}); `paceray tune --resume` "
                                  f"runs it once the server is back") from None
            if not said:
                print(f"paceray: trial {identity[keys.TRIAL_TAG]}: MLflow at {uri} is unreachable; waiting for it "
                      f"(up to {timeout:.0f} s) before training, so that every write has its run", flush=True)
                said = True
            time.sleep(2.0)


class TrialFailed(RuntimeError):
    """The trainable failed its trial and said why, in its final report."""
