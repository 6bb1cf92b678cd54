"""The owner of a trial's runs, from open to end: the one place a trial's final status is decided.

    open or find the run -> resume point -> fit -> outcome -> end the run (status, reason, tags)

`paceray train` and each Tune trial of `paceray tune` use it alike; where only the search's driver
can know a trial's outcome (a scheduler stopped it, its process died with the search), the driver
builds the trial's runner from its record and calls the same `end`, with the outcome Tune gave it.

A runner owns a mapping of arm -> run: one arm today, several when a trial trains several arms
side by side, each its own MLflow run. Its record (`RunDir.trial_records`) says which runs it owns
and how each ended, so the driver needs no MLflow query to find or judge them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from paceray.base.atomic import write_text_atomic
from paceray.base.errors import PacerayError, one_line
from paceray.cluster import queue_locations
from paceray.cluster.placement import placement_failure, placement_tags
from paceray.protocol import TrialContext, failure_of
from paceray.protocol.keys import ERROR_TAG, STOPPED_TAG, TRIAL_TAG
from paceray.protocol.packing import ARM_FAILURES_KEY, ARM_STOPPED_KEY, Arm
from paceray.tracking import runlog
from paceray.tracking import server as mlflow_server
from paceray.tracking.client import log_params
from paceray.tracking.run import Run
from paceray.trial.trainer import FitPlan, resume_point, trainer_for

ONLY_ARM = "a0"  # the arm of a trial that trains one


def open_located_run_log(context: TrialContext) -> runlog.RunLogger:
    """Rank 0's run logger (TrialContext.open_run_log), its queue's place told to the search's
    driver, if one listens (paceray.cluster.queue_locations): a queue left on a node that died is
    delivered or named at the search's end, never forgotten. A marker file beside the queue says
    which node opened it, until its queue is empty."""
    logger = runlog.open_for_trial(context)
    try:
        node = queue_locations.announce(logger.run_id, str(logger.folder))
    except Exception as e:  # bookkeeping: it never fails a trial, which then goes unnamed if lost
        print(f"warning: could not tell the search where run {logger.run_id}'s queue lies ({one_line(e)[:200]})",
              file=sys.stderr, flush=True)
        return logger
    if node is not None:
        mark = queue_locations.marker(logger.folder, node["node_id"])
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()

        def delivered() -> None:
            mark.unlink(missing_ok=True)
            try:
                queue_locations.announce_delivered(logger.run_id, node)
            except Exception:  # the search then checks an empty queue at its end: no harm
                pass

        logger.on_delivered = delivered
    return logger


class Outcome(Enum):
    FINISHED = "finished"  # trained to its last step
    FAILED = "failed"  # the trainable failed it in-band and said why (a NaN loss)
    NOT_PLACED = "not placed"  # its worker group could not be placed within resources.worker_wait_s
    CRASHED = "crashed"  # an exception reached Ray Train, and its retries ran out
    STOPPED = "stopped"  # a scheduler stopped it before its last step (only the driver knows)
    INTERRUPTED = "interrupted"  # its process died with the search (found when the search ends)


STATUS = {Outcome.FINISHED: "FINISHED", Outcome.FAILED: "FAILED", Outcome.NOT_PLACED: "FAILED",
          Outcome.CRASHED: "FAILED", Outcome.STOPPED: "KILLED", Outcome.INTERRUPTED: "FAILED"}
INTERRUPTED_REASON = "the trial did not finish (search interrupted or killed)"


@dataclass(frozen=True)
class Ending:
    """How a trial ended: its outcome, why (for a failure), the tags its runs get, who stopped it."""

    outcome: Outcome
    reason: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    stopped_by: str = ""
    error: Optional[BaseException] = None  # the exception fit() raised, for the caller to raise on
    result: Any = None  # Ray Train's Result, when fit() returned
    # Arms of a packed trial that failed in-band on their own (arm -> why): those end FAILED with
    # their reason whatever the trial's outcome; the others end as the trial did.
    arms_failed: Mapping[str, str] = field(default_factory=dict)
    # Arms the search's arm scheduler stopped (arm -> who): they end KILLED.
    arms_stopped: Mapping[str, str] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return STATUS[self.outcome]

    def for_arm(self, arm: str) -> "Ending":
        """How one arm of the trial ended."""
        if self.outcome is Outcome.INTERRUPTED:
            return self
        if arm in self.arms_failed:
            return Ending(Outcome.FAILED, self.arms_failed[arm])
        if arm in self.arms_stopped:
            return Ending(Outcome.STOPPED, stopped_by=self.arms_stopped[arm])
        return self


def arms_listed(result: Any, key: str) -> dict[str, str]:
    """Arm -> value of the mapping `key` in rank 0's return value: the arms that failed in-band
    (ARM_FAILURES_KEY: why) or that the arm scheduler stopped (ARM_STOPPED_KEY: at which step)."""
    found = getattr(result, "return_value", None)
    failed = found.get(key) if isinstance(found, Mapping) else None
    return {str(k): str(v) for k, v in failed.items()} if isinstance(failed, Mapping) else {}


@dataclass(frozen=True)
class RunRequest:
    """The run a trial opens: found by `identity` (a restarted trial, a resumed search) or created
    with `name`, `tags` and `params`, in `experiment` of the store `uri`."""

    uri: str
    experiment: str
    name: str
    identity: Mapping[str, str]
    tags: Mapping[str, str]
    params: Mapping[str, Any]
    run_dir: Path


RUN_START_TIMEOUT_ENV = "PACERAY_RUN_START_TIMEOUT"  # s a trial waits for MLflow to give it its run
RUN_START_TIMEOUT = 900.0


class RunUnavailable(RuntimeError):
    """MLflow stayed unreachable for longer than a trial waits to get its run."""


class TrialRunner:
    def __init__(self, trial_id: str, runs: Mapping[str, Run], record: Optional[Path] = None,
                 finished_before: bool = False, arm_ids: Optional[Mapping[str, str]] = None):
        self.trial_id = trial_id
        self.runs = dict(runs)
        self.record = record
        self.finished_before = finished_before  # its runs had finished already (a search killed just after)
        # arm -> the arm's own id (`<trial>-a<k>`) when the trial trains packed arms; empty unpacked
        self.arm_ids = dict(arm_ids or {})

    @property
    def run(self) -> Run:
        return self.runs[ONLY_ARM]

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, trial_id: str, request: RunRequest, record: Optional[Path] = None,
             say: Callable[[str], None] = print) -> "TrialRunner":
        """The trial's run, found by its identity or created (see `open_arms`)."""
        return cls.open_arms(trial_id, {ONLY_ARM: request}, record, say)

    @classmethod
    def open_arms(cls, trial_id: str, requests: Mapping[str, RunRequest], record: Optional[Path] = None,
                  say: Callable[[str], None] = print) -> "TrialRunner":
        """The run of every arm (arm -> its request), each found by its identity or created; while
        the server is away the trial waits, up to PACERAY_RUN_START_TIMEOUT seconds, and trains
        only once it has its runs: their writes need a run id to queue under. A retry finds a run
        created just before the outage by its identity tags and logs its parameters again (the same
        values: MLflow accepts that). A packed trial's arms are named by their `TRIAL_TAG`."""
        request = next(iter(requests.values()))
        timeout = float(os.environ.get(RUN_START_TIMEOUT_ENV, RUN_START_TIMEOUT))
        deadline, said = time.monotonic() + timeout, False
        while True:
            try:
                runner = cls._find_or_create(trial_id, requests, record)
                # A run that had finished stays ended as it was (its trial only re-reports its end).
                runner._write_record({arm: "FINISHED" for arm in runner.runs} if runner.finished_before else {})
                return runner
            except Exception as e:
                if mlflow_server.answers(request.uri):
                    raise
                if time.monotonic() > deadline:
                    raise RunUnavailable(f"MLflow at {request.uri} stayed unreachable for {timeout:.0f} s "
                                         f"({RUN_START_TIMEOUT_ENV}): the trial could not get its run "
                                         f"({type(e).__name__}); `paceray tune --resume` runs it once the server "
                                         f"is back") from None
                if not said:
                    say(f"paceray: trial {trial_id}: MLflow at {request.uri} is unreachable; waiting for it "
                        f"(up to {timeout:.0f} s) before training, so that every write has its run")
                    said = True
                time.sleep(2.0)

    @classmethod
    def _find_or_create(cls, trial_id: str, requests: Mapping[str, RunRequest],
                        record: Optional[Path]) -> "TrialRunner":
        runs, finished = {}, []
        for arm, request in requests.items():
            run = Run.find(request.uri, request.experiment, request.identity, request.run_dir) if request.identity else None
            if run is None:
                runs[arm] = Run.create(request.uri, request.experiment, request.name,
                                       {**request.identity, **request.tags}, request.run_dir, request.params)
                continue
            # A trial whose run finished just before the search was killed (Tune had not recorded
            # it yet) is re-run by the restore: its TorchTrainer only re-reports the final result,
            # and its run stays as it was.
            finished.append(run.resume())
            if not finished[-1]:
                log_params(request.uri, run.run_id, request.params)
            runs[arm] = run
        # A packed trial's arms carry ids of their own (`<trial>-a<k>`); an unpacked trial's, the trial's.
        arm_ids = {arm: r.identity.get(TRIAL_TAG, trial_id) for arm, r in requests.items()}
        packed = any(arm_id != trial_id for arm_id in arm_ids.values())
        return cls(trial_id, runs, record, finished_before=len(finished) == len(runs) and all(finished),
                   arm_ids=arm_ids if packed else None)

    @classmethod
    def resume(cls, trial_id: str, uri: str, run_id: str, run_dir: Path) -> "TrialRunner":
        """A `paceray train --resume`: the run its pointer names, RUNNING again."""
        run = Run(uri, run_id, run_dir)
        return cls(trial_id, {ONLY_ARM: run}, finished_before=run.resume())

    @classmethod
    def from_record(cls, record: Path, uri: str, run_dir: Path) -> Optional["TrialRunner"]:
        """The runner of a trial whose process is gone, from its record (the search's driver)."""
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError):  # no record (the trial never got its run), or one cut short
            return None
        runs = {arm: Run(uri, run_id, run_dir) for arm, run_id in saved.get("runs", {}).items()}
        return cls(saved.get("trial_id", record.stem), runs, record) if runs else None

    def ended(self) -> dict[str, str]:
        """arm -> the status its run was ended with, as recorded."""
        if self.record is None or not self.record.exists():
            return {}
        try:
            return dict(json.loads(self.record.read_text()).get("ended", {}))
        except ValueError:
            return {}

    def _write_record(self, ended: Mapping[str, str]) -> None:
        if self.record is not None:
            write_text_atomic(self.record, json.dumps({"trial_id": self.trial_id, "ended": dict(ended),
                                                       "runs": {arm: r.run_id for arm, r in self.runs.items()}}))

    # ------------------------------------------------------------------ resume point and fit

    def resume_point(self, trial_dir: Path, check: Optional[Callable[[str], None]]):
        """Where a resumed trial starts (paceray.trial.trainer.resume_point); a trial none of whose
        checkpoints loads ends FAILED here, with the one line that says so, which is raised."""
        try:
            return resume_point(trial_dir, check)
        except PacerayError as e:
            self.end(Ending(Outcome.FAILED, str(e)))
            raise

    def context(self, plan: FitPlan) -> TrialContext:
        arms = tuple(Arm(arm, self.arm_ids[arm], run.run_id) for arm, run in self.runs.items()) if self.arm_ids else ()
        first = next(iter(self.runs.values()))
        return TrialContext(trial_id=self.trial_id, run_id=first.run_id, open_run_log=open_located_run_log,
                            arms=arms, **plan.context)

    def fit(self, plan: FitPlan, stop_flag=None) -> Ending:
        """Fit the trial's TorchTrainer once and say how it ended (nothing is ended here: `end`)."""
        trainer = trainer_for(plan, self.context(plan))
        try:
            result = trainer.fit()
        except Exception as e:
            if stop_flag is not None and stop_flag.is_set():
                # Tune stopped this trial (a scheduler's decision) and its Train controller died
                # with it: the search's driver ends the run, from Tune's own result.
                return Ending(Outcome.STOPPED, error=e)
            why = placement_failure(e, plan.resources)
            return Ending(Outcome.NOT_PLACED if why else Outcome.CRASHED, why or str(e), error=e)
        reason, arms_failed = failure_of(result), arms_listed(result, ARM_FAILURES_KEY)
        by = getattr(plan.context.get("judge_arms"), "by", "arm scheduler")
        arms_stopped = {arm: by for arm in arms_listed(result, ARM_STOPPED_KEY)}
        if reason:  # the trainable ended the trial as failed, in-band (e.g. a NaN loss)
            return Ending(Outcome.FAILED, reason, result=result, arms_failed=arms_failed, arms_stopped=arms_stopped)
        return Ending(Outcome.FINISHED, tags=placement_tags(result), result=result, arms_failed=arms_failed,
                      arms_stopped=arms_stopped)

    # ------------------------------------------------------------------ the end

    def end(self, ending: Ending, say: bool = True) -> Optional[str]:
        """End every run the trial owns as `ending` says: the status its outcome has, the reason's
        last line (Ray wraps a worker's error in its traceback) as the error tag of a failure, who
        stopped it for a scheduler's stop (a stale error tag then goes: a stop is not a crash).
        A run that finished before this process opened it stays as it was; a run already ended
        with this status is not ended twice; a run already ended keeps its end against a finished
        or interrupted ending. An arm of a pack that failed on its own ends FAILED with its reason.
        Returns the replay command when the end waits on disk for the server (said on stderr)."""
        ended = self.ended()
        left = None
        for arm, run in self.runs.items():
            if self.finished_before:
                continue
            # An arm its own process ended (an arm of a pack failed on its own, a trial that
            # finished) keeps that end against the driver's after-the-fact finished or interrupted.
            if ending.outcome in (Outcome.INTERRUPTED, Outcome.FINISHED) and arm in ended:
                continue
            mine = ending.for_arm(arm)
            if ended.get(arm) == mine.status:
                continue
            tags, remove = dict(mine.tags), ()
            if mine.status == "FAILED":
                text = str(mine.reason).strip()
                tags[ERROR_TAG] = one_line(text.splitlines()[-1] if text else "failed")[:4000]
            elif mine.outcome is Outcome.STOPPED:
                tags[STOPPED_TAG] = mine.stopped_by
                remove = (ERROR_TAG,)
            left = run.end(mine.status, tags, remove) or left
            if say:
                run.say_waiting(left)
            ended[arm] = mine.status
        self._write_record(ended)
        return left
