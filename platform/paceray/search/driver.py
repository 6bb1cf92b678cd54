"""`paceray tune SPEC`: a search. One MLflow parent run per search, a child run per trial.

    checked   spec, resume state, tracking store, assets, Ray address: bad input fails here,
              before an MLflow run or a results folder exists
    started   the command lock, Ray, the cluster's capacity, the parent run, the Tuner
    fitted    Tuner.fit under the live view; then the trials only the driver can end
              (stopped by the scheduler, interrupted), the parent's end, the report
"""

from __future__ import annotations

import functools
import json
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from paceray.base import locks as command_lock
from paceray.base.atomic import read_state, write_text_atomic
from paceray.base.errors import PacerayError
from paceray.base.paths import RunDir, storage_root
from paceray.cluster import arm_scheduler
from paceray.cluster import connect as raycluster
from paceray.cluster import queue_locations
from paceray.protocol import STEP_KEY, keys, packing
from paceray.search import endings, leftover_queues, parent_run
from paceray.search import live_view as progress
from paceray.search import tuner as tuning
from paceray.search.trial_fn import search_context
from paceray.spec import packs as packs_lib
from paceray.spec.invocation import Invocation
from paceray.spec.specfile import LoadedSpec, load, parse_overrides
from paceray.tracking import server as mlflow_server
from paceray.tracking import stranded_queues
from paceray.tracking.outage import ServerWait, unless_away
from paceray.tracking.run import Run
from paceray.trial.prepare import check_same_store, prepare_assets, readable_store


@dataclass
class _Search:
    """One `paceray tune`, checked: its spec, run directory, storage root, the tracking server it
    names (None: the embedded store), the interrupted search it resumes, how it was asked."""

    loaded: LoadedSpec
    rd: RunDir
    storage: Path
    external: Optional[str]
    previous: Optional[dict]
    asked: Invocation

    @property
    def name(self) -> str:
        return self.loaded.spec.name

    @property
    def tuner_dir(self) -> Path:
        return self.rd.tuner(self.name)


def run_tune(asked: Invocation) -> None:
    search = _checked(asked)
    # One command per search, before it starts Ray: a second one would rename this one's tuner
    # folder under it and mix their trials.
    lock = ExitStack()
    lock.enter_context(command_lock.held(search.rd.search(search.name),
                                         f"the search {search.name!r} under {search.rd.root}"))
    try:
        results, comparison = _started(search)
    finally:
        lock.close()
        raycluster.shutdown()
    if search.external is None:
        print(f"MLflow UI: `{mlflow_server.ui_command(search.rd.root)}`" + (f", then open {comparison}" if comparison else ""))
    elif comparison:
        print(f"the trials compared in MLflow's UI: {comparison}")
    # The search went on past failures, and its report is written; the exit code still says so.
    if packs_lib.pack_size(search.loaded) is not None:  # its arms, not its packs, are what the user asked for
        arms_failed, arms = endings.failed_arms(search.rd.trial_records(search.name))
        if arms_failed and arms > len(results):
            raise PacerayError(f"{arms_failed} of {arms} arm(s) failed, in {len(results)} packed trial(s) "
                               f"(see the report above for why)")
    failed = [r for r in results if r.error is not None]
    if failed:
        raise PacerayError(f"{len(failed)} of {len(results)} trial(s) failed (see the report above for why)")


def _checked(asked: Invocation) -> _Search:
    """Everything that can fail on bad input fails here, before an MLflow run or a results folder exists."""
    loaded = load(asked.spec_path, parse_overrides(asked.overrides))
    spec = loaded.spec
    rd = RunDir(asked.run_dir_or(loaded.run_dir))
    state_path = rd.search_state(spec.name)
    previous = None
    if asked.resume:
        if not state_path.exists() or not rd.tuner(spec.name).exists():
            raise PacerayError(f"--resume: no interrupted search {spec.name!r} under {rd.root} "
                               f"({state_path} is missing)")
        previous = read_state(state_path, f"remove {state_path.parent} and {rd.tuner(spec.name)} to start the "
                                          f"search over")
    external = mlflow_server.external_uri(asked.tracking_uri or spec.tracking.uri)
    if previous:
        check_same_store(previous, external, f"search {spec.name!r}", state_path)
    if external:
        mlflow_server.check_reachable(external)
    storage = storage_root()
    prepare_assets(loaded, storage, readable_store(external, rd.root))
    raycluster.check_address(asked.address)
    return _Search(loaded, rd, storage, external, previous, asked)


def _started(search: _Search):
    """Ray, the cluster's capacity, the tracking session, the parent run and the Tuner; then the fit."""
    loaded, spec = search.loaded, search.loaded.spec
    where = raycluster.connect(search.asked.address)
    raycluster.check_tracking_reach(search.external)
    # A trial that cannot fit the cluster fails here, before anything is written.
    capacity, source = raycluster.cluster_capacity(spec.resources.max_cluster)
    concurrent = tuning.max_concurrent(loaded, capacity, source)
    if source != raycluster.PRESENT:
        print(f"paceray: up to {concurrent} trial(s) at once: the cluster can grow to "
              f"{raycluster.describe_resources(capacity)} ({source})", flush=True)
    worker_log = None if search.asked.verbose else _divert_worker_logs(search.rd.workers_log(search.name))
    if not search.previous and search.tuner_dir.exists():
        # A new search must not silently mix with the old one's trials and checkpoints.
        search.tuner_dir.rename(search.tuner_dir.with_name(f"{spec.name}.{time.strftime('%Y%m%d-%H%M%S')}"))
    with mlflow_server.tracking_session(search.rd.root, search.external) as uri:
        parent = _parent_run(search, uri)
        context = search_context(loaded, uri, parent.run_id, str(search.storage), search.rd.root,
                                 mlflow_server.client_env(embedded=search.external is None))
        context = replace(context, arm_judge=_arm_judge(search))
        queues = queue_locations.start()  # where each trial's tracking queue lies (its rank 0 says)
        tuner, total = tuning.build_tuner(loaded, context, concurrent, search.tuner_dir if search.previous else None)
        print(f"paceray tune {spec.name}: {where}; MLflow at {uri}; results in {search.tuner_dir}", flush=True)
        t = loaded.trainable
        shape = progress.SearchShape(spec.name, total, [("step", STEP_KEY), *(t.progress or [(loaded.metric,) * 2])],
                                     loaded.metric, loaded.mode, lambda config: horizon_of(t, config).steps,
                                     lambda config, trial_id: name_of(t, config, trial_id),
                                     functools.partial(arm_labels_of, t, searched=context.searched))
        view = progress.SearchView(shape, worker_log, live=False if search.asked.verbose else None)
        view.queues = search.rd.queues
        results = _fitted(search, uri, parent, tuner, view, queues)
        base = uri if search.external else mlflow_server.ui_base()
        return results, parent_run.comparison_url(uri, parent.run_id, base)


def _parent_run(search: _Search, uri: str) -> Run:
    """The search's parent run: the interrupted one again, or a new one with the spec and the UI view."""
    loaded, spec = search.loaded, search.loaded.spec
    if search.previous:
        parent = Run(uri, search.previous["parent_run_id"], search.rd.root)
        parent.resume()
        return parent
    parent = Run.create(uri, spec.experiment, f"search-{spec.name}",
                        {keys.KIND_TAG: "search", keys.SPEC_TAG: spec.path or "", keys.TRAINABLE_TAG: spec.trainable,
                         keys.METRIC_TAG: loaded.metric, keys.MODE_TAG: loaded.mode},
                        search.rd.root, parent_run.search_params(loaded))
    start = ServerWait(uri, "start")
    unless_away(start, "logging the spec", parent_run.log_spec, uri, parent.run_id, loaded)
    unless_away(start, "saving the UI view", parent_run.save_comparison, uri, parent.run_id, loaded, False)
    write_text_atomic(search.rd.search_state(spec.name), json.dumps(
        {"parent_run_id": parent.run_id, "experiment": spec.experiment, "spec": spec.path,
         "tracking_uri": search.external}))
    return parent


def _fitted(search: _Search, uri: str, parent: Run, tuner, view, queues):
    """Tuner.fit, then the ends only the driver can give: trials the scheduler stopped, trials
    interrupted, trial queues nobody delivered, the parent run's own; then the report. An outage
    at the end waits (bounded)."""
    spec, records = search.loaded.spec, search.rd.trial_records(search.name)
    status = "FAILED"
    end = ServerWait(uri, "end")
    try:
        with view:
            results = tuner.fit()
        status = "FINISHED"  # failed trials are marked on their own runs
        unless_away(end, "marking the trials a scheduler stopped", endings.end_stopped_trials, results, records, uri,
                    search.rd.root, spec.tune.scheduler, lambda config: horizon_of(search.loaded.trainable, config))
    finally:
        unless_away(end, "closing unfinished trials' runs", endings.close_interrupted_trials, records, uri,
                    search.rd.root)
        end.server_back()  # else the parent's end waits on disk for a replay
        stranded = leftover_queues.settle(queues, uri, mlflow_server.client_env(embedded=search.external is None),
                                          records)
        if stranded:
            leftover_queues.save(stranded, search.rd.search(search.name))
        # Queued if the server went away since: delivered below, once the report's wait has seen
        # it back; said now only if the search is failing.
        left = parent.end(status, {stranded_queues.TAG: stranded_queues.tag_value(stranded)} if stranded else None)
        if status != "FINISHED":
            parent.say_waiting(left)
    if not unless_away(end, "the report", parent_run.finish, uri, parent.run_id, search.loaded, results):
        print(f"the search's report waits for MLflow: `paceray report {spec.experiment}` writes it later "
              f"(the trials' queued writes first: the replay commands above)", flush=True)
    if left and not (end.server_back() and parent.deliver_leftovers()):
        parent.say_waiting(left)
    if stranded:
        print(f"paceray: {len(stranded)} trial queue(s) left undelivered (in "
              f"{search.rd.search(search.name) / leftover_queues.FILE}):", flush=True)
        for q in stranded:
            print(f"  {stranded_queues.describe(q, search.external)}", flush=True)
    return results


def _arm_judge(search: _Search):
    """A packed search with `scheduler: asha` judges arms, not trials: its arm scheduler (a Ray
    actor the driver owns; a resumed search continues from its saved state), or None."""
    loaded, t = search.loaded, search.loaded.spec.tune
    if packs_lib.pack_size(loaded) is None or t.scheduler != "asha":
        return None
    path = search.rd.arm_scheduler(search.name)
    if not search.previous:
        path.unlink(missing_ok=True)  # a new search judges afresh
    actor = arm_scheduler.start(path, grace=tuning.grace_period(loaded), reduction_factor=t.reduction_factor,
                                max_t=loaded.trainable.horizon(loaded.base).steps, mode=loaded.mode)
    return arm_scheduler.ArmJudge(actor, by=t.scheduler)


def horizon_of(trainable, config: dict):
    """A trial's horizon; a packed trial's is its arms' (they share their steps: paceray.spec.packs)."""
    return max((trainable.horizon(arm) for arm in packing.arms_of(config)), key=lambda h: h.steps)


def name_of(trainable, config: dict, trial_id: str) -> str:
    """A trial's name in the live view; a packed trial's counts its arms."""
    if not packing.is_packed(config):
        return trainable.run_name(packing.arms_of(config)[0], trial_id)
    return f"{trial_id} (a pack of {len(packing.arms_of(config))} arms)"


def arm_labels_of(trainable, config: dict, searched: tuple = ()) -> list[str]:
    """A trial's arms' labels (Trainable.arm_label), a packed trial's in order (a0, a1, ...)."""
    return [trainable.arm_label(arm, searched) for arm in packing.arms_of(config)]


def _divert_worker_logs(path: Path) -> Path:
    """Ray's worker output into `path` (appended: a resumed search's lines follow the first's)."""
    from paceray.cluster.ray_internals import divert_worker_logs

    path.parent.mkdir(parents=True, exist_ok=True)
    sink = open(path, "a", buffering=1)
    sink.write(f"--- paceray tune, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    divert_worker_logs(sink)
    return path
