"""Packed arms for real: one Tune trial, one Ray Train worker group of 2 gloo ranks, several arms
in lockstep, each its own MLflow run, each exactly the trial it would be alone."""

from __future__ import annotations

import re

import pytest

from conftest import experiment_runs, history, prelaunched, tiny_base, write_spec

pytestmark = pytest.mark.slow

ORDERS = ["none", "easy-to-hard", "shuffled"]
# 10 steps on 2 ranks, a log every 5, one eval at the end.
BASE = dict(train={"steps": 10, "log_every": 5, "batch_size": 16},
            eval={"every": 10, "fid_samples": 32, "sampler_steps": 4, "batch_size": 32, "sample_grid": 4},
            curriculum={"stage_steps": 2},
            # Under p2 weighting with k → 0 and γ = 40, w(t) = 1/(k + snr)^γ overflows at high t:
            # an arm so weighted goes non-finite in its first steps. Uniform arms ignore them.
            loss={"p2_k": 1e-30, "p2_gamma": 40.0})
RESOURCES = {"workers": 2, "cpus_per_worker": 1}


def _search(shared, tmp, name: str, weightings: list[str], pack) -> tuple:
    spec = write_spec(tmp / f"{name}.yaml", name, tiny_base(**BASE),
                      search={"curriculum.order": {"grid": ORDERS}, "loss.weighting": {"grid": weightings}},
                      resources=RESOURCES, tune={"pack": pack})
    result = shared.paceray("tune", spec, "--run-dir", tmp / "runs", check=False)
    return result, experiment_runs(shared, name)


@prelaunched
def packed_and_alone(shared, tmp):
    """The same three uniform arms, packed (with three arms that go non-finite beside them) and
    each alone, against the shared cluster (2 CPUs: one 2-rank group at a time)."""
    packed = _search(shared, tmp, "packed", ["uniform", "p2"], 6)
    alone = _search(shared, tmp, "alone", ["uniform"], 1)
    return packed, alone


def _trials(runs) -> dict:
    return {(r.data.params["curriculum.order"], r.data.params["loss.weighting"]): r for r in runs
            if r.data.tags.get("paceray.kind") == "trial"}


def test_a_pack_is_one_trial_whose_arms_are_runs_of_their_own(packed_and_alone):
    (result, (client, runs)), _ = packed_and_alone
    out = result.stdout
    events = [line for line in out.splitlines() if re.match(r"\[\d+:\d\d\] trial ", line)]
    assert sum(" started · " in line for line in events) == 1, events  # one trial: one worker group
    arms = _trials(runs)
    assert len(arms) == 6
    packs = {r.data.tags["paceray.pack"] for r in arms.values()}
    assert len(packs) == 1
    (pack,) = packs
    assert sorted(r.data.tags["paceray.trial_id"] for r in arms.values()) == [f"{pack}-a{k}" for k in range(6)]
    for run in arms.values():
        assert run.info.run_name.endswith(run.data.tags["paceray.trial_id"])
        assert run.data.tags["mlflow.parentRunId"] == next(
            r.info.run_id for r in runs if r.data.tags.get("paceray.kind") == "search")


def test_one_batch_per_rank_per_step_serves_every_arm(packed_and_alone):
    (_, (client, runs)), _ = packed_and_alone
    for (order, weighting), run in _trials(runs).items():
        if weighting == "uniform":
            assert history(client, run.info.run_id, "data/batches_drawn") == [(5, 5.0), (10, 10.0)], order


def test_a_non_finite_arm_fails_alone_and_the_search_says_so(packed_and_alone):
    (result, (client, runs)), _ = packed_and_alone
    arms = _trials(runs)
    for order in ORDERS:
        bad, good = arms[(order, "p2")], arms[(order, "uniform")]
        assert bad.info.status == "FAILED", order
        assert bad.data.tags["paceray.error"].startswith("non-finite loss"), bad.data.tags
        assert good.info.status == "FINISHED", order
        assert [s for s, _ in history(client, good.info.run_id, "eval/fid")] == [10]
    assert result.returncode != 0
    assert "paceray: error: 3 of 6 arm(s) failed, in 1 packed trial(s)" in result.stderr + result.stdout


def test_each_arm_trains_exactly_as_its_trial_alone(packed_and_alone):
    """Same seed, same batches, timesteps, noise and initial weights: on the loop path (fp32, the
    same batch shapes and threads) every logged loss is equal bit for bit. The FID too: each arm
    samples and is scored alone, with the same generator seeds, so no tolerance is needed."""
    (_, (packed_client, packed_runs)), (alone_result, (alone_client, alone_runs)) = packed_and_alone
    assert alone_result.returncode == 0, alone_result.stdout[-3000:]
    packed, alone = _trials(packed_runs), _trials(alone_runs)
    assert len(alone) == 3 and all("paceray.pack" not in r.data.tags for r in alone.values())
    for order in ORDERS:
        p, a = packed[(order, "uniform")], alone[(order, "uniform")]
        for key in ("train/loss", "train/loss_c1", "eval/fid"):
            got, want = history(packed_client, p.info.run_id, key), history(alone_client, a.info.run_id, key)
            assert got == want and got, (order, key, got, want)


# ----------------------------------------------------------------- a killed worker, a killed driver

def _registered_step(run_dir, name: str):
    from paceray.base.errors import PacerayError
    from paceray.trial.trainer import latest_checkpoint

    for trial_dir in (run_dir / "ray" / name / "trials").glob("trial-*"):
        try:
            ckpt = latest_checkpoint(trial_dir)
        except PacerayError:  # Ray's snapshot caught mid-write: not yet
            continue
        if ckpt is not None:
            return int(ckpt.name.removeprefix("checkpoint_step")[:8])
    return None


def _wait(condition, proc, what: str, timeout: float = 600):
    import time

    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert proc.poll() is None, proc.output()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


@prelaunched(long=True)
def killed_pack(shared, tmp):
    """A pack of three arms, one worker, 400 steps: its worker SIGKILLed after a checkpoint (Ray
    Train restarts the group from it), then the driver SIGKILLed after a later checkpoint, then
    `paceray tune --resume`."""
    import os
    import signal

    from conftest import kill_session

    spec = write_spec(tmp / "killedpack.yaml", "killedpack",
                      tiny_base(train={"steps": 400, "log_every": 5, "batch_size": 16},
                                eval={"every": 25, "fid_samples": 16, "sampler_steps": 2, "batch_size": 16,
                                      "sample_grid": 0},
                                curriculum={"stage_steps": 40}),
                      search={"curriculum.order": {"grid": ["none", "easy-to-hard", "random"]}},
                      tune={"pack": 3})
    run_dir = tmp / "runs"
    workers_log = run_dir / "searches" / "killedpack" / "workers.log"
    proc = shared.start("tune", spec, "--run-dir", run_dir, log=tmp / "tune.log")
    try:
        first = _wait(lambda: _registered_step(run_dir, "killedpack"), proc, "a first checkpoint")
        pids = set(re.findall(r"\(RayTrainWorker pid=(\d+)\)", workers_log.read_text()))
        assert len(pids) == 1, pids
        os.kill(int(pids.pop()), signal.SIGKILL)
        _wait(lambda: workers_log.read_text().count("resumed from the checkpoint") >= 3, proc, "the restart")
        at_driver_kill = _wait(lambda: (s := _registered_step(run_dir, "killedpack") or 0) > first + 25 and s,
                               proc, "a later checkpoint")
    finally:
        kill_session(proc.pid)
        proc.wait(timeout=60)
    shared.wait_until_job_gone(proc.pid)
    resumed = shared.paceray("tune", spec, "--run-dir", run_dir, "--resume", check=False)
    return {"first": first, "at_driver_kill": at_driver_kill, "resumed": resumed, "log": workers_log.read_text()}


def test_a_killed_pack_resumes_every_arm_with_each_step_once(killed_pack, shared):
    resumed = killed_pack["resumed"]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # the worker's restart resumed all three arms from the pack's checkpoint
    assert killed_pack["log"].count(f"resumed from the checkpoint at step {killed_pack['first']}") == 3
    assert killed_pack["at_driver_kill"] < 400  # the driver died mid-pack
    client, runs = experiment_runs(shared, "killedpack")
    arms = [r for r in runs if r.data.tags.get("paceray.kind") == "trial"]
    assert len(arms) == 3 and len({r.data.tags["paceray.pack"] for r in arms}) == 1
    for run in arms:
        assert run.info.status == "FINISHED", run.data.tags
        for key in ("train/loss", "curriculum/stage"):
            steps = [m.step for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)]
            assert steps == list(range(5, 401, 5)), (run.data.params["curriculum.order"], key, steps)
        assert [s for s, _ in history(client, run.info.run_id, "eval/fid")] == list(range(25, 401, 25))


# ----------------------------------------------------------------- arms ending on their own

@prelaunched
def scheduled_pack(shared, tmp):
    """Six arms in one pack under `scheduler: asha` (rungs at steps 5 and 10, rf 2): the three p2
    arms go non-finite in their first steps; the arm scheduler stops the worse of the rest."""
    spec = write_spec(tmp / "armasha.yaml", "armasha",
                      tiny_base(**{**BASE, "train": {"steps": 20, "log_every": 5, "batch_size": 16},
                                   "eval": {**BASE["eval"], "every": 5}}),
                      search={"curriculum.order": {"grid": ORDERS}, "loss.weighting": {"grid": ["uniform", "p2"]}},
                      tune={"pack": 6, "scheduler": "asha", "grace_steps": 5, "reduction_factor": 2})
    return shared.paceray("tune", spec, "--run-dir", tmp / "runs", check=False), tmp / "runs"


def test_the_arm_scheduler_stops_arms_of_a_pack_beside_a_failed_one(scheduled_pack, shared):
    import json

    result, run_dir = scheduled_pack
    client, runs = experiment_runs(shared, "armasha")
    arms = _trials(runs)
    status = {key: run.info.status for key, run in arms.items()}
    assert all(status[(order, "p2")] == "FAILED" for order in ORDERS), status
    uniform = [arms[(order, "uniform")] for order in ORDERS]
    stopped = [r for r in uniform if r.info.status == "KILLED"]
    finished = [r for r in uniform if r.info.status == "FINISHED"]
    # rung 5: the worst of three stops; rung 10: the worse of the two left
    assert len(stopped) == 2 and len(finished) == 1, status
    for run in stopped:
        assert run.data.tags["paceray.stopped_early"] == "asha"
        assert "paceray.error" not in run.data.tags
        last = max(s for s, _ in history(client, run.info.run_id, "eval/fid"))
        assert last in (5, 10)
    assert [s for s, _ in history(client, finished[0].info.run_id, "eval/fid")] == [5, 10, 15, 20]
    assert result.returncode != 0
    assert "paceray: error: 3 of 6 arm(s) failed, in 1 packed trial(s)" in result.stderr + result.stdout
    state = json.loads((run_dir / "searches" / "armasha" / "arm_scheduler.json").read_text())
    assert sorted(state["recorded"]) == ["10", "5"] and len(state["recorded"]["5"]) == 3
