"""Ray Tune over trials: search algorithm, scheduler, resources, and the function each trial runs.

Each Tune trial is a function trainable that fits one `TorchTrainer` (the Train V2 pattern);
`TuneReportCallback` forwards rank 0's reports to Tune. Its MLflow child run is found by the
trial id before one is created, so a restarted trial or a resumed search never makes a second run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from paceray.base.dotted import set_path, unflatten
from paceray.base.errors import PacerayError
from paceray.base.paths import RunDir
from paceray.cluster.connect import HEAD_RESOURCE, PRESENT, describe_resources
from paceray.protocol import STEP_KEY, packing
from paceray.search.trial_fn import SearchContext, run_trial
from paceray.spec import packs as packs_lib
from paceray.spec.specfile import Distribution, LoadedSpec


def param_space(loaded: LoadedSpec, algorithm: str, points: list) -> dict:
    """The trial config with Tune distributions at the searched paths (nested like the config).

    grid: the grid's and the arms' paths hold the values the expanded points use
    (points_to_evaluate sets each trial's; see search_alg); random: Tune expands the grid and `tune.seeds` per sample;
    optuna: only constants (the define-by-run space suggests the rest)."""
    import copy

    from ray import tune

    from paceray.spec import space as space_lib

    config = copy.deepcopy(loaded.base)
    if algorithm == "optuna":
        return config
    for key, dist in loaded.search.items():
        if algorithm == "grid" and dist.kind == "grid":
            used = list(dict.fromkeys(json_key(p[key]) for p in points))
            value = tune.grid_search([json.loads(v) for v in used])
        else:
            value = tune_distribution(dist)
        set_path(config, key, value)
    for key in space_lib.arm_paths(loaded):  # grid only (specfile.check_arms_algorithm); preset per point
        used = list(dict.fromkeys(json_key(p[key]) for p in points))
        set_path(config, key, tune.grid_search([json.loads(v) for v in used]))
    seeds = space_lib.seeds(loaded)
    if seeds:
        set_path(config, loaded.trainable.seed_path, tune.grid_search(seeds))
    return config


def tune_distribution(dist: Distribution):
    """A spec's distribution as Ray Tune's."""
    from ray import tune

    kind, args = dist.kind, dist.args
    if kind == "grid":
        return tune.grid_search(list(args))
    if kind == "choice":
        return tune.choice(list(args))
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](*args)


TUNE_TRIAL_ID = "trial_id"  # Tune puts the trial's id into every result it reports


def trial_id_of(result) -> Optional[str]:
    """The Tune trial id of a Tune `Result` (the id the trial's own process read from its context)."""
    return (getattr(result, "metrics", None) or {}).get(TUNE_TRIAL_ID)


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
    from paceray.spec import space as space_lib

    t = loaded.spec.tune
    if t.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # metric and mode come from TuneConfig; a conditional space: see space.define_by_run
        return OptunaSearch(space=space_lib.define_by_run(loaded), seed=t.seed)
    from ray.tune.search import BasicVariantGenerator

    if t.algorithm == "grid":
        # Each canonical grid point (× seed) once per num_samples; Tune samples the rest.
        presets = [unflatten(p) for p in points] * t.num_samples
        return BasicVariantGenerator(points_to_evaluate=presets, random_state=t.seed, max_concurrent=concurrent)
    # random: a sample's values stay the same over the seeds' grid (its replicates)
    return BasicVariantGenerator(constant_grid_search=bool(t.seeds), random_state=t.seed, max_concurrent=concurrent)


def packed_space(loaded: LoadedSpec, concurrent: int):
    """A packed search as Tune sees it, run FIFO: one grid value per pack, each a packed config
    (every arm's config, expanded on the driver: paceray.spec.packs), one pass; or, for Optuna,
    at most one trial per arm (its searcher says when it is done). Returns the param space, the
    trial count (None: not known ahead), Tune's num_samples and the search algorithm."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    if loaded.spec.tune.algorithm == "optuna":
        return {}, None, loaded.spec.tune.num_samples, packed_optuna(loaded, concurrent)
    packs = packs_lib.packs(loaded, packs_lib.arm_configs(loaded), slots=concurrent)
    space = {packing.ARMS_KEY: tune.grid_search(packs)}
    return space, len(packs), 1, BasicVariantGenerator(max_concurrent=concurrent)


def packed_optuna(loaded: LoadedSpec, concurrent: int):
    """Optuna asked for K points per Tune trial (paceray.search.packed_searcher); `auto`: K fills
    the trials that run at once, within the trainable's `max_pack`."""
    import functools

    from ray.tune.search.optuna import OptunaSearch

    from paceray.search.packed_searcher import PackedSearcher
    from paceray.spec import space as space_lib

    t, hooks = loaded.spec.tune, loaded.trainable.packing
    size = packs_lib.pack_size(loaded)
    k = min(hooks.max_pack(loaded.base), math.ceil(t.num_samples / concurrent)) if size == "auto" else int(size)
    # Metric and mode given here: Tune passes them to a searcher only with a non-empty param space.
    inner = OptunaSearch(space=space_lib.define_by_run(loaded), metric=loaded.metric, mode=loaded.mode, seed=t.seed)
    return PackedSearcher(inner, loaded.base, max(1, k),
                          t.num_samples, canonical=functools.partial(space_lib.canonical, loaded), key=hooks.key)


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
    from paceray.spec import space as space_lib

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


def build_tuner(loaded: LoadedSpec, context: SearchContext, concurrent: int, tuner_path: Optional[Path]):
    """A fresh Tuner and its trial count, or the restored one (count None: Tune knows it) when
    `tuner_path` holds an interrupted search. Tune's own trial table is off: the command's live
    view (paceray.search.live_view) shows the search, fed by the ProgressCallback."""
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
    from paceray.search.live_view import ProgressCallback
    from paceray.spec import space as space_lib

    if packs_lib.pack_size(loaded) is not None:  # FIFO in Tune; ASHA judges arms (cluster.arm_scheduler)
        space, total, samples, algorithm = packed_space(loaded, concurrent)
        sched = None
    else:
        points = space_lib.grid_points(loaded) if t.algorithm == "grid" else []  # expanded once
        space, total = param_space(loaded, t.algorithm, points), num_samples(loaded, points)
        samples, algorithm, sched = total, search_alg(loaded, concurrent, points), scheduler(loaded)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=loaded.metric, mode=loaded.mode, num_samples=samples,
            search_alg=algorithm, scheduler=sched,
            max_concurrent_trials=concurrent if t.algorithm == "optuna" else None,
        ),
        run_config=tune.RunConfig(
            name=loaded.spec.name, storage_path=str(RunDir(context.run_dir).ray_results),
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[ProgressCallback()], verbose=0,
        ),
    ), total
