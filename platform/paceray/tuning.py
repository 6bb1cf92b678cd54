"""Ray Tune over trials: search algorithm, scheduler, resources, and the function each trial runs.

Each Tune trial is a function trainable that fits one `TorchTrainer` (the Train V2 pattern);
`TuneReportCallback` forwards rank 0's reports to Tune. Its MLflow child run is found by the
trial id before one is created, so a restarted trial or a resumed search never makes a second run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from paceray import tracking
from paceray.errors import PacerayError
from paceray.spec import LoadedSpec, flatten, load_trainable, set_path
from paceray.trial import Resources, TrialContext, trainer_for, trial_storage

def param_space(loaded: LoadedSpec, algorithm: str) -> dict:
    """The trial config with Tune distributions at the searched paths (nested like the config)."""
    import copy

    space = copy.deepcopy(loaded.base)
    for key, dist in loaded.search.items():
        if algorithm == "optuna" and dist.kind == "grid":
            from ray import tune

            value = tune.choice(list(dist.args))  # Optuna takes no grid: sample the same values
        else:
            value = dist.to_tune()
        set_path(space, key, value)
    return space


def max_concurrent(loaded: LoadedSpec, cluster: dict[str, float]) -> int:
    """Trials whose training workers fit in the cluster at once.

    The workers' placement group is invisible to Tune, so without this cap Tune starts more trials
    than there are workers for and they wait forever (WorkerGroupStartupTimeoutError).
    """
    r = loaded.spec.resources
    fits = []
    cpu_need = r.workers * r.cpus_per_worker + r.trial_cpus
    fits.append(math.floor(cluster.get("CPU", 0) / cpu_need + 1e-9) if cpu_need else 10**6)
    if r.gpus_per_worker:
        fits.append(math.floor(cluster.get("GPU", 0) / (r.workers * r.gpus_per_worker) + 1e-9))
    n = min(fits)
    if n < 1:
        have = ", ".join(f"{k}={v:g}" for k, v in sorted(cluster.items()) if k in ("CPU", "GPU"))
        raise PacerayError(f"{loaded.spec.path}: resources: one trial needs {r.workers} worker(s) × "
                           f"{r.cpus_per_worker} CPU, {r.gpus_per_worker} GPU but the cluster has {have}")
    if loaded.spec.tune.max_concurrent:
        n = min(n, loaded.spec.tune.max_concurrent)
    return n


def search_alg(loaded: LoadedSpec):
    t = loaded.spec.tune
    if t.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=t.seed)  # metric and mode come from TuneConfig
    return None  # grid and random: Tune's variant generator (grid_search expands, others sample)


def scheduler(loaded: LoadedSpec):
    t = loaded.spec.tune
    if t.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    every = loaded.base["eval"]["every"]
    # Scheduled on our own `step` (not training_iteration, which restarts at 1 after a restore).
    # max_t one past the last step: ASHA stops a trial that reaches max_t, and a trial stopped
    # at its final report would lose its end (the schedule plot, its run's FINISHED status).
    return ASHAScheduler(time_attr="step", max_t=loaded.base["train"]["steps"] + 1,
                         grace_period=t.grace_evals * every, reduction_factor=t.reduction_factor)


def run_trial(config: dict, search: dict) -> None:
    """The Tune function trainable: one MLflow child run, one TorchTrainer fit.

    `search` (tracking URI, parent run, storage) comes through `tune.with_parameters`, not the
    trial config: it is given afresh when a search is restored (the embedded MLflow server of
    the new process listens on a new port).
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    uri, parent = search["tracking_uri"], search["parent_run_id"]
    tracking.apply_client_env(search["client_env"])  # this process was started before the command set it
    run_id = tracking.find_run(uri, search["experiment"], {tracking.TRIAL_TAG: trial_id,
                                                          tracking.PARENT_TAG: parent})
    already_finished = False
    if run_id is None:
        name = f"{config['curriculum']['order']}-N{config['curriculum']['num_clusters']}-{trial_id}"
        run_id = tracking.create_run(uri, search["experiment"], name,
                                     {tracking.TRIAL_TAG: trial_id, tracking.PARENT_TAG: parent,
                                      tracking.KIND_TAG: "trial"}, flatten(config))
    else:
        # A trial whose run finished just before the search was killed (Tune had not recorded it
        # yet) is re-run by the restore: its TorchTrainer only re-reports the final result, and its
        # run stays as it was.
        already_finished = tracking.client(uri).get_run(run_id).info.status == "FINISHED"
        if not already_finished:
            tracking.client(uri).update_run(run_id, status="RUNNING")
    trainable = load_trainable(search["trainable"])
    ctx = TrialContext(trial_id=trial_id, run_id=run_id, tracking_uri=uri, storage=search["storage"],
                       run_dir=search["run_dir"], console_progress=search.get("console_progress", True))
    run_dir = Path(search["run_dir"])
    trainer = trainer_for(trainable, config, ctx, Resources(**search["resources"]),
                          trial_storage(run_dir) / search["name"] / "trials", name=f"trial-{trial_id}",
                          keep_best=config["train"]["checkpoint_keep"], callbacks=[TuneReportCallback()])
    stop_flag = _tune_stop_flag()
    try:
        trainer.fit()
    except Exception as e:
        if stop_flag is not None and stop_flag.is_set():
            # Tune stopped this trial (a scheduler's decision) and its Train controller died with
            # it: not a failure. The search driver marks the run KILLED from Tune's own result.
            raise
        tracking.record_failure(uri, run_id, e)
        tracking.end_trial_run(uri, run_id, "FAILED", run_dir)
        raise
    reason = tracking.trial_error(uri, run_id)
    if reason:  # the trainable ended its trial as failed (e.g. a NaN loss): Tune sees an error
        tracking.end_trial_run(uri, run_id, "FAILED", run_dir)
        raise TrialFailed(reason)
    if not already_finished:
        tracking.end_trial_run(uri, run_id, "FINISHED", run_dir)


def _tune_stop_flag():
    """The event Tune sets when it stops this trial, or None where this Ray keeps it elsewhere."""
    try:
        from ray.train._internal.session import get_session

        return getattr(get_session(), "stop_event", None)
    except ImportError:
        return None


class TrialFailed(RuntimeError):
    """The trainable failed its trial and said why (the reason is in the run's paceray.error tag)."""


def search_context(loaded: LoadedSpec, uri: str, parent_run_id: str, storage: str, run_dir: Path,
                   client_env: dict[str, str]) -> dict[str, Any]:
    r = loaded.spec.resources
    return {
        "client_env": client_env,
        "tracking_uri": uri,
        "parent_run_id": parent_run_id,
        "experiment": loaded.spec.experiment,
        "trainable": loaded.spec.trainable,
        "storage": storage,
        "run_dir": str(run_dir),
        "name": loaded.spec.name,
        "resources": {"workers": r.workers, "cpus_per_worker": r.cpus_per_worker,
                      "gpus_per_worker": r.gpus_per_worker},
        "console_progress": True,
    }


def build_tuner(loaded: LoadedSpec, context: dict, concurrent: int, tuner_path: Optional[Path]):
    """A fresh Tuner, or the restored one when `tuner_path` holds an interrupted search."""
    from ray import tune

    trial_cpus = loaded.spec.resources.trial_cpus
    # The trial function only waits on its TorchTrainer. Tune refuses an empty bundle, so a
    # zero-CPU trial asks for a token of memory instead of a CPU its workers would then lack.
    trial_bundle = {"CPU": trial_cpus} if trial_cpus > 0 else {"CPU": 0, "memory": 2**20}
    trainable = tune.with_resources(tune.with_parameters(run_trial, search=context), trial_bundle)
    t = loaded.spec.tune
    if tuner_path is not None:
        # Finished trials stay finished; errored and unfinished ones continue from their checkpoints.
        return tune.Tuner.restore(str(tuner_path), trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=param_space(loaded, t.algorithm),
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, num_samples=t.num_samples, search_alg=search_alg(loaded),
            scheduler=scheduler(loaded), max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(
            name=loaded.spec.name, storage_path=str(trial_storage(Path(context["run_dir"]))),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=1,
        ),
    )
