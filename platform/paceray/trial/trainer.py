"""One trial = one Ray Train `TorchTrainer` run of the trainable's `train_loop(config, context)`.

Used as is by `paceray train`, and inside each Tune trial by `paceray tune`. The trainer's
`name` is stable per trial: Ray Train resumes a run from `{storage_path}/{name}`, so a
restarted trial continues from its latest checkpoint instead of starting over.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from paceray.base.errors import PacerayError, one_line
from paceray.cluster.placement import gather_placement
from paceray.protocol import FAILURE_KEY, STEP_KEY, CheckpointFallback, Trainable, TrialContext
from paceray.protocol.keys import PLACEMENT_KEY
from paceray.protocol.packing import arms_of
from paceray.spec.specfile import ResourcesSection

PLACEMENT_STRATEGIES = {"pack": "PACK", "spread": "SPREAD", "strict-pack": "STRICT_PACK",
                        "strict-spread": "STRICT_SPREAD"}
# Ray Train's own wait for a worker group's placement, per try (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S).
GROUP_START_TIMEOUT_ENV, GROUP_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0
RESIZE_INTERVAL_ENV = "PACERAY_ELASTIC_RESIZE_INTERVAL"  # s between an elastic trial's looks for more workers


@dataclass(frozen=True)
class FitPlan:
    """What one fit of a trial needs beside its runner: the trainable and its config, the resources
    of its worker group, where Ray Train keeps it (`storage_path`/`name`), and the context fields
    its workers are told."""

    trainable: Trainable
    config: dict
    resources: ResourcesSection
    storage_path: Path
    name: str
    context: Mapping[str, Any]  # TrialContext fields besides trial_id and run_id
    mode: str = "min"
    callbacks: tuple = ()


def trainer_for(plan: FitPlan, context: TrialContext):
    """A TorchTrainer for one trial; `fit()` it to run (or resume) the trial. The config goes to
    the workers as the trial's config alone; the context travels beside it, as its own argument."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from paceray.cluster.ray_internals import node_aware_torch_config, torch_trainer_class

    # Only these travel to the workers: the loop (a module-level function, pickled by reference and
    # imported on the worker) and the context.
    loop, resources, config = plan.trainable.train_loop, plan.resources, plan.config

    def train_loop_per_worker(trial_config: dict) -> Optional[dict]:
        placement = gather_placement()
        returned = loop(trial_config, context)
        # Rank 0's return value is the Result's: an in-band failure reaches the platform this way
        # (Ray Train V2's Result.metrics holds only reports that carried a checkpoint), beside what
        # the loop itself returned, if a mapping (benchmarks/throughput.py's timings).
        extra = dict(returned) if isinstance(returned, Mapping) else {}
        return {**extra, FAILURE_KEY: context.failed, PLACEMENT_KEY: placement}

    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    elastic = resources.min_workers is not None
    scaling = ScalingConfig(num_workers=(resources.min_workers, resources.workers) if elastic else resources.workers,
                            use_gpu=use_gpu, resources_per_worker=per_worker,
                            placement_strategy=PLACEMENT_STRATEGIES[resources.placement])
    if elastic and os.environ.get(RESIZE_INTERVAL_ENV):
        scaling.elastic_resize_monitor_interval_s = float(os.environ[RESIZE_INTERVAL_ENV])
    return torch_trainer_class()(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config=config,
        torch_config=node_aware_torch_config("nccl" if use_gpu else "gloo", resources.socket_ifname),
        scaling_config=scaling,
        run_config=RunConfig(
            name=plan.name,
            storage_path=str(plan.storage_path),
            failure_config=FailureConfig(max_failures=resources.max_failures,
                                         controller_failure_limit=_group_start_retries(resources.worker_wait_s)),
            # Ray keeps the latest checkpoint besides the best K by the search metric.
            checkpoint_config=CheckpointConfig(num_to_keep=max(plan.trainable.checkpoints_to_keep(arm)
                                                               for arm in arms_of(config)),
                                               checkpoint_score_attribute=context.metric,
                                               checkpoint_score_order=plan.mode),
            callbacks=list(plan.callbacks),
        ),
    )


def _group_start_retries(wait_s: float) -> int:
    """Ray Train's controller_failure_limit for a trial that may wait `wait_s` seconds for its
    worker group: each failed try to place the group lasts Ray's group-start timeout, and its
    default limit (-1) retries for ever, so a trial whose nodes are gone would never end."""
    import math

    per_try = float(os.environ.get(GROUP_START_TIMEOUT_ENV, GROUP_START_TIMEOUT))
    return max(0, math.ceil(wait_s / per_try) - 1)


def _registered(trial_dir: Path):
    """Ray Train's record of a trial's checkpoints (a `Result`), or None when it registered none.
    Ray rewrites its snapshot in place, so a kill mid-write leaves it empty or cut: that is one
    line naming it (Ray itself could not resume from it either)."""
    from ray.train import Result

    from paceray.cluster.ray_internals import CHECKPOINT_SNAPSHOT, unreadable_snapshot_error

    try:
        return Result.from_path(str(trial_dir))
    except unreadable_snapshot_error() as e:
        raise PacerayError(one_line(f"{Path(trial_dir) / CHECKPOINT_SNAPSHOT}: unreadable ({e}), a write cut short by a crash; "
                                    f"remove {trial_dir} to start this trial over")) from None
    except (RuntimeError, ValueError, OSError):  # no such run folder, or Ray registered nothing there yet
        return None


def latest_checkpoint(trial_dir: Path) -> Optional[Path]:
    """The checkpoint Ray Train will resume from: the latest one it registered (a folder on disk
    may be one a crash cut short while it was being written, which Ray ignores)."""
    result = _registered(trial_dir)
    checkpoint = result.checkpoint if result is not None else None
    return Path(checkpoint.path) if checkpoint is not None else None


def resume_point(trial_dir: Path, check: Optional[Callable[[str], None]]) -> Optional[CheckpointFallback]:
    """None when the trial resumes from its latest checkpoint as Ray Train would (or has none);
    when that one does not load, the newest earlier registered checkpoint that does, for the
    trainable to load instead (`TrialContext.checkpoint()`). Ray's own record stays as it is:
    only its public `Result` is read, and nothing under the trial's folder is changed."""
    result = _registered(trial_dir) if check is not None else None
    if result is None or result.checkpoint is None:
        return None
    latest = result.checkpoint.path.rstrip("/")
    try:
        check(latest)
        return None
    except PacerayError as e:
        reason = str(e)
    steps = {c.path.rstrip("/"): m.get(STEP_KEY) for c, m in result.best_checkpoints}
    steps.pop(latest, None)
    # Newest first: by the step each checkpoint's report carried, the folder name where none did.
    newest_first = sorted(steps, key=lambda p: (steps[p] if steps[p] is not None else -1, p), reverse=True)
    for i, path in enumerate(newest_first):
        try:
            check(path)
        except PacerayError:
            continue
        skipped = tuple(os.path.basename(p) for p in [latest, *newest_first[:i]])
        return CheckpointFallback(corrupted=latest, use=path, step=steps[path], reason=reason, skipped=skipped)
    raise PacerayError(one_line(f"{reason}; no earlier checkpoint of {trial_dir} loads either "
                                f"({len(steps)} registered): remove {trial_dir} to start this trial over"))
