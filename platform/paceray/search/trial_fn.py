"""The function each Tune trial runs, through the trial's runner (paceray.trial.runner): its MLflow
child run (found by the trial id before one is created, so a restarted trial or a resumed search
never makes a second run) and one TorchTrainer fit; `TuneReportCallback` forwards rank 0's reports
to Tune."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from paceray.base.dotted import flatten
from paceray.base.errors import PacerayError
from paceray.base.paths import RunDir
from paceray.cluster.ray_internals import tune_stop_flag
from paceray.protocol import keys, packing
from paceray.spec import registry
from paceray.spec.specfile import LoadedSpec, ResourcesSection
from paceray.tracking.server import apply_client_env
from paceray.trial.runner import FitPlan, Outcome, RunRequest, RunUnavailable, TrialRunner


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
    searched: tuple = ()  # the paths the search varies, the seed path aside (Trainable.arm_label)
    arm_judge: object = None  # a packed search's arm scheduler (paceray.cluster.arm_scheduler.ArmJudge)


def search_context(loaded: LoadedSpec, uri: str, parent_run_id: str, storage: str, run_dir: Path,
                   client_env: dict[str, str]) -> SearchContext:
    return SearchContext(trainable=loaded.spec.trainable, name=loaded.spec.name, experiment=loaded.spec.experiment,
                         tracking_uri=uri, parent_run_id=parent_run_id, storage=storage, run_dir=str(run_dir),
                         resources=loaded.spec.resources.model_dump(), metric=loaded.metric, mode=loaded.mode,
                         client_env=client_env, searched=searched_without_seed(loaded))


def searched_without_seed(loaded: LoadedSpec) -> tuple[str, ...]:
    from paceray.spec.space import searched_paths

    return tuple(p for p in searched_paths(loaded) if p != loaded.trainable.seed_path)


def run_trial(config: dict, search: SearchContext) -> None:
    """The Tune function trainable: the trial's runner opens (or finds) its MLflow child run,
    fits one TorchTrainer, and ends the run as the fit ended; a failure is raised for Tune to see."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    apply_client_env(search.client_env)  # this process was started before the command set it
    trainable = registry.resolve(search.trainable)
    run_dir = RunDir(search.run_dir)
    try:
        runner = TrialRunner.open_arms(trial_id, arm_requests(config, trial_id, search, trainable),
                                       run_dir.trial_records(search.name) / f"{trial_id}.json",
                                       say=lambda line: print(line, flush=True))
    except RunUnavailable as e:
        raise TrialFailed(str(e)) from None
    name = f"trial-{trial_id}"
    try:  # a resumed search's trial: the same check as `paceray train --resume`
        fallback = runner.resume_point(run_dir.tune_trials(search.name) / name, trainable.check_checkpoint)
    except PacerayError as e:
        raise TrialFailed(str(e)) from None
    if fallback is not None:
        print(f"paceray: trial {trial_id}: {fallback.message()}", flush=True)
    plan = FitPlan(trainable, config, ResourcesSection(**search.resources), run_dir.tune_trials(search.name), name,
                   context=dict(tracking_uri=search.tracking_uri, storage=search.storage, run_dir=search.run_dir,
                                metric=search.metric, mode=search.mode, judge_arms=search.arm_judge,
                                console_progress=search.console_progress, fallback=fallback),
                   mode=search.mode, callbacks=(TuneReportCallback(),))
    ending = runner.fit(plan, stop_flag=tune_stop_flag())
    if ending.outcome is Outcome.STOPPED:
        raise ending.error  # the search's driver ends the run, from Tune's own result
    runner.end(ending)
    if ending.error is not None:
        raise ending.error
    if ending.outcome is not Outcome.FINISHED:  # failed in-band (e.g. a NaN loss): Tune sees an error
        raise TrialFailed(ending.reason)


def arm_requests(config: dict, trial_id: str, search: SearchContext, trainable) -> dict[str, RunRequest]:
    """The run each arm of the trial opens: the trial's own, or for a packed trial one per arm,
    named and identified by the arm's id and tagged with its pack (the Tune trial)."""
    run_dir = RunDir(search.run_dir).root
    if not packing.is_packed(config):
        arms = {packing.arm_key(0): (trial_id, packing.arms_of(config)[0], {})}
    else:
        pack_tags = {keys.PACK_TAG: trial_id, keys.PACK_WIDE_TAG: "perf/img_per_s, eval/seconds, system/*"}
        arms = {packing.arm_key(i): (packing.arm_trial_id(trial_id, i), arm, pack_tags)
                for i, arm in enumerate(packing.arms_of(config))}
    return {arm: RunRequest(search.tracking_uri, search.experiment, trainable.run_name(arm_config, arm_id),
                            identity={keys.TRIAL_TAG: arm_id, keys.PARENT_TAG: search.parent_run_id},
                            tags={keys.KIND_TAG: "trial", keys.TRAINABLE_TAG: search.trainable,
                                  keys.ARM_TAG: trainable.arm_label(arm_config, search.searched), **tags},
                            params=flatten(arm_config), run_dir=run_dir)
            for arm, (arm_id, arm_config, tags) in arms.items()}


class TrialFailed(RuntimeError):
    """The trainable failed its trial and said why, in its final report."""
