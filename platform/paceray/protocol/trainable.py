"""The trainable protocol: everything the platform may ask of a trainable, in one declared object.

A trainable is a folder under `trainables/` (or any importable module) that declares one
`Trainable` — like torchtitan's `TrainSpec`, a named bundle of builders — and registers it as an
entry point of the group `paceray.trainables` (pyproject.toml). A spec names it by that entry
point's name, or by a dotted import path `package.module:ATTRIBUTE`.

`TrialContext` is what a trial's `train_loop` is told beside its config: its run, its storage,
the checkpoint to resume from, the in-band failure report and its run logger. Importing this
module imports no torch, Ray or MLflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from paceray.base.errors import one_line
from paceray.protocol.keys import CHECKPOINT_PREFIX, FAILURE_KEY
from paceray.protocol.packing import Arm, Packing
from paceray.protocol.run_log import RunLog

if TYPE_CHECKING:  # pragma: no cover
    from paceray.protocol.report_hook import ReportHook


@dataclass(frozen=True)
class Horizon:
    """How long a trial runs, for the scheduler: its last `step`, and the steps between the
    reports that carry the search metric (early stopping decides only at those)."""

    steps: int
    report_every: int


@dataclass(frozen=True)
class PrepareContext:
    """What `prepare` may use: the storage root and the tracking store the command reads from
    (an HTTP server, or the embedded SQLite file, read-only at that point), and a way to read an
    earlier run's artifact from it: `fetch_artifact(run_id, artifact_path) -> bytes`, raising
    LookupError saying why it could not (the tracking layer implements it; a trainable imports
    no MLflow)."""

    storage: str
    tracking_uri: Optional[str]
    fetch_artifact: Optional[Callable[[str, str], bytes]] = None



@dataclass(frozen=True)
class CheckpointFallback:
    """The latest registered checkpoint does not load (`reason`); resume from `use` instead,
    the newest earlier checkpoint that does (at `step`). `skipped`: the folder names of the
    registered checkpoints newer than `use`, which Ray still keeps, so new ones must not reuse
    them (Ray deleting a skipped one would delete the new one in its place)."""

    corrupted: str
    use: str
    step: Optional[int]
    reason: str
    skipped: tuple[str, ...] = ()

    def message(self) -> str:
        at = f" (step {self.step})" if self.step is not None else ""
        return one_line(f"{self.reason}; resuming from {self.use}{at}, the newest earlier checkpoint that loads")


@dataclass
class TrialContext:
    """What the platform tells a trainable's `train_loop` beyond its config, on every worker."""

    trial_id: str
    run_id: Optional[str]  # the MLflow run rank 0 logs into
    tracking_uri: Optional[str]
    storage: str  # storage root: datasets, feature nets, cached statistics
    run_dir: str
    metric: str  # the search metric, which the failure report must carry
    mode: str = "min"  # its direction: a packed trial reports its best arm's (paceray.protocol.packing)
    console_progress: bool = True
    failed: Optional[str] = None  # set by fail(); what the worker function returns to the platform
    # Set when the latest checkpoint Ray registered does not load: the newest earlier one that
    # does, which `checkpoint()` gives in its place (see paceray.trial.trainer.resume_point).
    fallback: Optional["CheckpointFallback"] = None
    # How the trial's run logger is made: the platform's tracking layer sets it (a module-level
    # function, pickled by reference to every worker), so this layer imports no MLflow.
    open_run_log: Optional[Callable[["TrialContext"], RunLog]] = None
    # A packed trial's arms, in the order of its config's (paceray.protocol.packing); () unpacked.
    arms: tuple[Arm, ...] = ()
    # A packed search's arm scheduler (ASHA over arms): rank 0 calls `judge_arms(step, {arm id:
    # metric})` at each eval and stops the arms it answers True for; None: no early stopping.
    judge_arms: Optional[Callable[[int, Mapping[str, float]], Mapping[str, bool]]] = None

    def arm_context(self, arm: Arm) -> "TrialContext":
        """The context of one arm of a packed trial: its id and run (its run logger logs there)."""
        return replace(self, trial_id=arm.trial_id, run_id=arm.run_id, arms=(), judge_arms=None)

    def checkpoint(self):
        """The checkpoint to resume from: Ray Train's `get_checkpoint()`, unless that is the
        corrupted one the platform found before this run started, then the one it chose instead.
        Use it in place of `ray.train.get_checkpoint()`."""
        import ray.train

        found = ray.train.get_checkpoint()
        fallback = self.fallback
        if found is not None and fallback is not None and found.path.rstrip("/") == fallback.corrupted:
            return type(found)(path=fallback.use, filesystem=found.filesystem)
        return found

    def checkpoint_dir_name(self, step: int) -> str:
        """The folder name of the checkpoint reported at `step` (the name tells its step; past a
        fallback, one the skipped checkpoints do not hold)."""
        name = f"{CHECKPOINT_PREFIX}{step:08d}"
        return f"{name}-resumed" if self.fallback is not None and name in self.fallback.skipped else name

    def run_logger(self) -> Optional[RunLog]:
        """The trial's run logger (every write queued on disk; see paceray.tracking.runlog), or
        None when the trial has no run. Call it on rank 0 only: it also samples that node's system
        metrics (paceray.tracking.system_metrics) until it is closed."""
        if not self.run_id or self.open_run_log is None:
            return None
        return self.open_run_log(self)

    def fail(self, reason: str, **metrics: Any) -> None:
        """End the trial as failed, in-band: call it on every rank (it reports, and a report is a
        barrier), then return from `train_loop`. The final report carries the reason (Tune sees
        it); the platform marks the trial FAILED with it in Tune, in the command's exit code and in
        MLflow. No exception reaches Ray Train, so it does not retry what would fail again."""
        import ray.train

        self.failed = one_line(reason)
        ray.train.report({**metrics, self.metric: math.nan, FAILURE_KEY: self.failed})


def failure_of(result: Any) -> Optional[str]:
    """The reason a trial failed in-band (from a Ray Train `Result` or a report's metrics), or None."""
    for found in (getattr(result, "return_value", None), getattr(result, "metrics", None), result):
        if isinstance(found, Mapping) and found.get(FAILURE_KEY):
            return str(found[FAILURE_KEY])
    return None


def default_run_name(config: dict, trial_id: str) -> str:
    return trial_id


def default_arm_label(config: dict, searched: Sequence[str]) -> str:
    """`path=value` for every path the search varies (the seed aside); `base` where it varies none."""
    from paceray.base.dotted import get_path

    return ", ".join(f"{path}={get_path(config, path)}" for path in searched) or "base"


@dataclass(frozen=True)
class Trainable:
    """One trainable, declared. The platform asks it, and nothing else, for what is trainable-specific.

    config               pydantic model of a trial's config (its module imports no torch)
    train_loop           `train_loop(config, context)`: the Ray Train per-worker function; it
                         reports with `ray.train.report({..., "step": s}, checkpoint=...)`
    metric, mode         the default search metric and its direction (a spec's `tune` overrides)
    horizon              `horizon(config) -> Horizon`: step budget and report interval
    run_name             `run_name(config, trial_id) -> str`: the trial's MLflow run name
    checkpoints_to_keep  `checkpoints_to_keep(config) -> int`: best K by the metric (plus the latest)
    prepare              `prepare(config, PrepareContext) -> config | None`: one-off assets before
                         any run exists (datasets, feature nets); may return the config with
                         references resolved (e.g. a run id replaced by a file in the storage root)
    export               `export(checkpoint_dir, config, out_dir)`: the best model as a folder
    check_checkpoint     `check_checkpoint(checkpoint_dir)`: raise PacerayError saying why it does
                         not load; a resume then starts from the newest earlier one that does
    commands             `commands() -> [click.Command]`: CLI tools mounted under `paceray`
                         (the module they come from imports only click)
    report               `report() -> ReportHook`: the domain part of `paceray report`
    irrelevant           `irrelevant(config) -> [dotted path]`: the settings that the config's
                         other settings make irrelevant (e.g. the cluster count of a run without a
                         curriculum). The platform puts them back to the base's values (the
                         canonical config), so grid points differing only there run once, and
                         Optuna is not asked for them (a conditional space)
    seed_path            the dotted config path of the trial's seed: `tune.seeds` replicates
                         every arm over it, and the report pairs arms by it
    judged_from          `judged_from(config) -> int | None`: the first step from which the
                         metric of this config compares fairly with others' (e.g. when a
                         curriculum has shown every timestep); ASHA gives every trial at least
                         the largest over the search space before stopping any
    progress             `(header, result key)` pairs: the columns of a running trial in a
                         search's live view, besides its step (default: the metric)
    packing              `Packing`: which configs may share one trial (`tune.pack`) and how many;
                         its train_loop then takes a packed config (paceray.protocol.packing).
                         None: the trainable never packs
    arm_label            `arm_label(config, searched) -> str`: which arm of the search the
                         config is, from the paths the search varies (`searched`: its `search`
                         and `arms` paths, the seed path aside); the same for every seed of an
                         arm. The run's tag paceray.arm, the live view and the report's arms
    resume_fixed         dotted config paths (a prefix covers everything under it) that a resumed
                         `paceray train` may not change: its checkpoint could not follow (e.g. the
                         architecture); a change is refused in one line before the run is touched
    """

    name: str
    config: type
    train_loop: Callable[[dict, TrialContext], None]
    metric: str
    horizon: Callable[[dict], Horizon]
    mode: str = "min"
    run_name: Callable[[dict, str], str] = default_run_name
    arm_label: Callable[[dict, Sequence[str]], str] = default_arm_label
    checkpoints_to_keep: Callable[[dict], int] = lambda config: 2
    prepare: Optional[Callable[[dict, PrepareContext], Optional[dict]]] = None
    export: Optional[Callable[[str, dict, str], Any]] = None
    check_checkpoint: Optional[Callable[[str], None]] = None
    commands: Callable[[], Sequence[Any]] = lambda: ()
    report: Optional[Callable[[], "ReportHook"]] = None
    irrelevant: Optional[Callable[[dict], Sequence[str]]] = None
    seed_path: Optional[str] = None
    judged_from: Optional[Callable[[dict], Optional[int]]] = None
    progress: Sequence[tuple[str, str]] = ()
    resume_fixed: Sequence[str] = ()
    packing: Optional[Packing] = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"trainable {self.name!r}: mode must be 'min' or 'max', got {self.mode!r}")
