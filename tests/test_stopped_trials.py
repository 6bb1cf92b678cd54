"""How a search marks the runs of trials its scheduler stopped, from Tune's own results.

A stop kills the trial's process; whether the trial's run is left RUNNING or (its Train
controller dying first, the trial's error path running) FAILED depends on timing. These cases
pin the outcome for each, on a real MLflow store and Tune's own Result objects."""

from __future__ import annotations

from paceray.protocol import keys
from paceray.tracking import runlog
from paceray.tracking import spool
from paceray.tracking import client as tracking
from paceray.base.paths import RunDir
from paceray.search.endings import close_interrupted_trials, end_stopped_trials
from paceray.trial.runner import Ending, Outcome, RunRequest, TrialRunner
from trainables.denoiser import TRAINABLE


def _result(trial_id: str, step: int, steps: int = 300, error: Exception | None = None):
    from ray.tune import Result

    # Tune puts the trial's config into its reported metrics; Result.config reads it from there.
    metrics = {"trial_id": trial_id, "step": step, "config": {"train": {"steps": steps}, "eval": {"every": 30}}}
    return Result(metrics=metrics, checkpoint=None, error=error, path=f"/nowhere/run_trial_{trial_id}")


def test_stopped_trials_become_killed_whatever_status_the_stop_left(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.create_run(uri, "exp", "search", {keys.KIND_TAG: "search"})
    c = tracking.client(uri)

    records = RunDir(tmp_path).trial_records("search")

    def child(tid: str, status: str, error: str | None = None) -> str:
        """A trial's run as its own process left it: opened by its runner, maybe ended by it."""
        runner = TrialRunner.open(tid, RunRequest(uri, "exp", tid, {keys.TRIAL_TAG: tid, keys.PARENT_TAG: parent}, {},
                                                  {}, tmp_path), records / f"{tid}.json")
        if status == "FAILED":
            runner.end(Ending(Outcome.CRASHED, error))
        elif status == "FINISHED":
            runner.end(Ending(Outcome.FINISHED))
        return runner.run.run_id

    left_running = child("a", "RUNNING")
    left_failed = child("b", "FAILED", "ActorDiedError: the actor died unexpectedly")
    stopped_at_end = child("c", "RUNNING")
    finished = child("d", "FINISHED")
    crashed = child("e", "FAILED", "non-finite loss at step 40")
    results = [_result("a", 60), _result("b", 90), _result("c", 300), _result("d", 300),
               _result("e", 40, error=RuntimeError("non-finite loss"))]

    # The stopped process had queued two log intervals it never sent.
    queued = runlog.spool_dir(tmp_path, left_running)
    for step in (65, 70):
        spool.append(queued, {"kind": "metrics", "run_id": left_running, "step": step,
                              "timestamp": spool.now_ms(), "metrics": {"train/loss": 0.5}})

    end_stopped_trials(results, records, uri, tmp_path, "asha", TRAINABLE.horizon)

    assert [m.step for m in c.get_metric_history(left_running, "train/loss")] == [65, 70]
    assert not queued.exists()

    for rid in (left_running, left_failed):
        run = c.get_run(rid)
        assert run.info.status == "KILLED"
        assert run.data.tags.get("paceray.stopped_early") == "asha"
        assert keys.ERROR_TAG not in run.data.tags  # a stop is not a crash
    for rid in (stopped_at_end, finished):
        run = c.get_run(rid)
        assert run.info.status == "FINISHED" and "paceray.stopped_early" not in run.data.tags
    run = c.get_run(crashed)  # Tune saw its error: it stays failed, with its reason
    assert run.info.status == "FAILED" and run.data.tags[keys.ERROR_TAG].startswith("non-finite")


def test_orphans_get_their_queued_writes_then_fail(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.create_run(uri, "exp", "search", {keys.KIND_TAG: "search"})
    records = RunDir(tmp_path).trial_records("search")
    orphan = TrialRunner.open("t", RunRequest(uri, "exp", "t", {keys.TRIAL_TAG: "t", keys.PARENT_TAG: parent}, {}, {},
                                              tmp_path), records / "t.json").run.run_id
    spool.append(runlog.spool_dir(tmp_path, orphan), {"kind": "metrics", "run_id": orphan, "step": 5,
                                                      "timestamp": spool.now_ms(), "metrics": {"train/loss": 1.0}})
    close_interrupted_trials(records, uri, tmp_path)
    run = tracking.client(uri).get_run(orphan)
    assert run.info.status == "FAILED" and "did not finish" in run.data.tags[keys.ERROR_TAG]
    assert run.data.metrics == {"train/loss": 1.0}


def test_a_finished_trial_rerun_by_a_restore_keeps_its_end(tmp_path):
    """A trial whose run finished just before its search was killed is re-run by the restore (Tune
    had not recorded it): its runner finds the run finished and nothing ends it again."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.create_run(uri, "exp", "search", {keys.KIND_TAG: "search"})
    records = RunDir(tmp_path).trial_records("search")
    request = RunRequest(uri, "exp", "f", {keys.TRIAL_TAG: "f", keys.PARENT_TAG: parent}, {}, {}, tmp_path)
    TrialRunner.open("f", request, records / "f.json").end(Ending(Outcome.FINISHED))
    c = tracking.client(uri)
    run_id = tracking.find_run(uri, "exp", {keys.TRIAL_TAG: "f"})
    ended_at = c.get_run(run_id).info.end_time

    again = TrialRunner.open("f", request, records / "f.json")  # the restore's re-run
    assert again.finished_before and again.ended() == {"a0": "FINISHED"}
    again.end(Ending(Outcome.FINISHED))
    end_stopped_trials([_result("f", 300)], records, uri, tmp_path, "asha", TRAINABLE.horizon)
    close_interrupted_trials(records, uri, tmp_path)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == ended_at
