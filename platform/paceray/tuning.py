"""Ray Tune over trials: search algorithm, scheduler, resources, and the function each trial runs.

Each Tune trial is a function trainable that fits one `TorchTrainer` (the Train V2 pattern);
`TuneReportCallback` forwards rank 0's reports to Tune. Its MLflow child run is found by the
trial id before one is created, so a restarted trial or a resumed search never makes a second run.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from paceray import registry, tracking
from paceray.errors import PacerayError
from paceray.mlflow_server import apply_client_env
from paceray.protocol import STEP_KEY, TrialContext, failure_of
from paceray.ray_internals import tune_stop_flag
from paceray.raycluster import HEAD_RESOURCE, PRESENT, describe_resources
from paceray.runs import Run
from paceray.spec import LoadedSpec, ResourcesSection, flatten, set_path
from paceray.trial import placement_failure, placement_tags, resume_point, trainer_for, trial_storage


def param_space(loaded: LoadedSpec, algorithm: str, points: list) -> dict:
    """The trial config with Tune distributions at the searched paths (nested like the config).

    grid: the grid's paths hold the values the expanded points use (points_to_evaluate sets
    each trial's; see search_alg); random: Tune expands the grid and `tune.seeds` per sample;
    optuna: only constants (the define-by-run space suggests the rest)."""
    import copy

    from ray import tune

    from paceray import space as space_lib

    config = copy.deepcopy(loaded.base)
    if algorithm == "optuna":
        return config
    for key, dist in loaded.search.items():
        if algorithm == "grid" and dist.kind == "grid":
            used = list(dict.fromkeys(json_key(p[key]) for p in points))
            value = tune.grid_search([json.loads(v) for v in used])
        else:
            value = dist.to_tune()
        set_path(config, key, value)
    seeds = space_lib.seeds(loaded)
    if seeds:
        set_path(config, loaded.trainable.seed_path, tune.grid_search(seeds))
    return config


def json_key(value) -> str:
    return json.dumps(value, sort_keys=True)


def num_samples(loaded: LoadedSpec, points: list) -> int:
    """Tune's num_samples: one per expanded grid point (grid), else the spec's."""
    if loaded.spec.tune.algorithm == "grid":
        return len(points) * loaded.spec.tune.num_samples
    return loaded.spec.tune.num_samples


def max_concurrent(loaded: LoadedSpec, cluster: dict[str, float], source: str = PRESENT) -> int:
    """Trials whose training workers fit in the cluster at once (`cluster`, which is `source`:
    raycluster.cluster_capacity).

    The workers' placement group is invisible to Tune, so without this cap Tune starts more trials
    than there are workers for and they wait forever (WorkerGroupStartupTimeoutError). An
    elastic trial (resources.min_workers) counts at its minimum: it runs on what is left.
    """
    r = loaded.spec.resources
    fits = []
    workers = r.fewest_workers
    cpu_need = workers * r.cpus_per_worker + r.trial_cpus
    fits.append(math.floor(cluster.get("CPU", 0) / cpu_need + 1e-9) if cpu_need else 10**6)
    if r.gpus_per_worker:
        fits.append(math.floor(cluster.get("GPU", 0) / (workers * r.gpus_per_worker) + 1e-9))
    n = min(fits)
    if n < 1:
        have = describe_resources(cluster)
        if source == PRESENT:
            has = (f"the cluster has {have} ({PRESENT}; on an autoscaling cluster whose maximum Ray does "
                   f"not report, set resources.max_cluster)")
        else:
            has = f"the cluster can grow to only {have} ({source})"
        raise PacerayError(f"{loaded.spec.path}: resources: one trial needs {workers} worker(s) × "
                           f"{r.cpus_per_worker} CPU, {r.gpus_per_worker} GPU but {has}")
    if loaded.spec.tune.max_concurrent:
        n = min(n, loaded.spec.tune.max_concurrent)
    return n


def search_alg(loaded: LoadedSpec, concurrent: int, points: list):
    """Tune ignores `max_concurrent_trials` when given a BasicVariantGenerator, so the generators
    get the cap themselves (OptunaSearch, a Searcher, is capped by Tune)."""
    from paceray import space as space_lib

    t = loaded.spec.tune
    if t.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # metric and mode come from TuneConfig; a conditional space: see space.define_by_run
        return OptunaSearch(space=space_lib.define_by_run(loaded), seed=t.seed)
    from ray.tune.search import BasicVariantGenerator

    if t.algorithm == "grid":
        # Each canonical grid point (× seed) once per num_samples; Tune samples the rest.
        presets = [space_lib.unflatten(p) for p in points] * t.num_samples
        return BasicVariantGenerator(points_to_evaluate=presets, random_state=t.seed, max_concurrent=concurrent)
    # random: a sample's values stay the same over the seeds' grid (its replicates)
    return BasicVariantGenerator(constant_grid_search=bool(t.seeds), random_state=t.seed, max_concurrent=concurrent)


def scheduler(loaded: LoadedSpec):
    t = loaded.spec.tune
    if t.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    horizon = loaded.trainable.horizon(loaded.base)
    # Scheduled on the trial's own `step` (not training_iteration, which restarts at 1 after a
    # restore). max_t one past the last step: ASHA stops a trial that reaches max_t, and a trial
    # stopped at its final report would lose its end (its run's FINISHED status, end-of-trial plots).
    return ASHAScheduler(time_attr=STEP_KEY, max_t=horizon.steps + 1, grace_period=grace_period(loaded),
                         reduction_factor=t.reduction_factor)


def grace_period(loaded: LoadedSpec, warn=print) -> int:
    """ASHA's grace period in steps: from the largest step before which a trial of the space
    cannot be judged (the trainable's `judged_from`; for a curriculum, when it has shown every
    timestep), plus `grace_evals` evals. `tune.grace_steps` overrides it; lower, with a warning."""
    from paceray import space as space_lib

    t = loaded.spec.tune
    every = loaded.trainable.horizon(loaded.base).report_every
    judged = space_lib.judged_from(loaded)
    fair = (judged or 0) + t.grace_evals * every
    if t.grace_steps is None:
        return fair
    if judged is not None and t.grace_steps < fair:
        warn(f"paceray: warning: {loaded.spec.path}: tune.grace_steps {t.grace_steps} lets ASHA stop trials before "
             f"step {judged}, when some trial of this space is first judged fairly ({fair} = that + "
             f"{t.grace_evals} eval(s)); its curriculum may not have shown every timestep yet")
    return t.grace_steps


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
    identity = {tracking.TRIAL_TAG: trial_id, tracking.PARENT_TAG: search.parent_run_id}
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
                           console_progress=search.console_progress, fallback=fallback)
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

    from paceray.mlflow_server import answers

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
            run = Run.create(uri, search.experiment, name, {**identity, tracking.KIND_TAG: "trial",
                                                            tracking.TRAINABLE_TAG: search.trainable}, run_dir)
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
                print(f"paceray: trial {identity[tracking.TRIAL_TAG]}: MLflow at {uri} is unreachable; waiting for it "
                      f"(up to {timeout:.0f} s) before training, so that every write has its run", flush=True)
                said = True
            time.sleep(2.0)


class TrialFailed(RuntimeError):
    """The trainable failed its trial and said why, in its final report."""


def build_tuner(loaded: LoadedSpec, context: SearchContext, concurrent: int, tuner_path: Optional[Path]):
    """A fresh Tuner and its trial count, or the restored one (count None: Tune knows it) when
    `tuner_path` holds an interrupted search. Tune's own trial table is off: the command's live
    view (paceray.progress) shows the search, fed by the ProgressCallback."""
    from ray import tune

    # Tune's newer output engine prints its configuration box and TensorBoard hint even at
    # verbose=0; the legacy one is silent there (read by tune.run in this process).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trial_cpus = loaded.spec.resources.trial_cpus
    # The trial function only waits on its TorchTrainer. Tune refuses an empty bundle, so a
    # zero-CPU trial asks for a token of memory instead of a CPU its workers would then lack.
    trial_bundle = {"CPU": trial_cpus} if trial_cpus > 0 else {"CPU": 0, "memory": 2**20}
    # On the head: the trial's process hosts its Train controller (Ray places it on the node of
    # the process that calls fit()), so a worker node lost takes only worker ranks with it.
    trial_bundle[HEAD_RESOURCE] = 0.001
    trainable = tune.with_resources(tune.with_parameters(run_trial, search=context), trial_bundle)
    t = loaded.spec.tune
    if tuner_path is not None:
        # Finished trials stay finished; errored and unfinished ones continue from their checkpoints.
        return tune.Tuner.restore(str(tuner_path), trainable=trainable, resume_errored=True), None
    from paceray import space as space_lib
    from paceray.progress import ProgressCallback

    points = space_lib.grid_points(loaded) if t.algorithm == "grid" else []  # expanded once
    total = num_samples(loaded, points)
    return tune.Tuner(
        trainable,
        param_space=param_space(loaded, t.algorithm, points),
        tune_config=tune.TuneConfig(
            metric=loaded.metric, mode=loaded.mode, num_samples=total,
            search_alg=search_alg(loaded, concurrent, points), scheduler=scheduler(loaded),
            max_concurrent_trials=concurrent if t.algorithm == "optuna" else None,
        ),
        run_config=tune.RunConfig(
            name=loaded.spec.name, storage_path=str(trial_storage(Path(context.run_dir))),
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[ProgressCallback()], verbose=0,
        ),
    ), total
