"""Packed arms for real: one Tune trial, one Ray Train worker group of 2 gloo ranks, several arms
in lockstep, each its own MLflow run, each exactly the trial it would be alone."""

from __future__ import annotations

import re

import pytest

from conftest import experiment_runs, history, prelaunched, tiny_base, write_spec

pytestmark = pytest.mark.slow

ORDERS = ["none", "easy-to-hard", "shuffled"]
# The arm also trained alone: the fifth of the pack's six (order-major: none, easy-to-hard,
# shuffled, each uniform then p2), so that it follows arms of other curricula and weightings.
ALONE = "shuffled"
# 10 steps on 2 ranks, a log and an eval every 5.
BASE = dict(train={"steps": 10, "log_every": 5, "batch_size": 16},
            eval={"every": 5, "fid_samples": 32, "sampler_steps": 4, "batch_size": 32, "sample_grid": 4},
            curriculum={"stage_steps": 2},
            # Under p2 weighting with k → 0 and γ = 40, w(t) = 1/(k + snr)^γ overflows at high t:
            # an arm so weighted goes non-finite in its first steps. Uniform arms ignore them.
            loss={"p2_k": 1e-30, "p2_gamma": 40.0})
RESOURCES = {"workers": 2, "cpus_per_worker": 1}


def _search(shared, tmp, name: str, orders: list[str], weightings: list[str], tune: dict) -> tuple:
    spec = write_spec(tmp / f"{name}.yaml", name, tiny_base(**BASE),
                      search={"curriculum.order": {"grid": orders}, "loss.weighting": {"grid": weightings}},
                      resources=RESOURCES, tune=tune)
    result = shared.paceray("tune", spec, "--run-dir", tmp / "runs", check=False)
    return result, experiment_runs(shared, name), tmp / "runs"


@prelaunched
def packed_and_alone(shared, tmp):
    """Three uniform arms packed, and one of them alone, against the shared cluster (2 CPUs: one
    2-rank group at a time). Beside them in the pack, three arms that go non-finite in their first
    steps; and the arm scheduler (ASHA over arms, one rung at step 5, rf 2) stops the worst of the
    three uniform arms there."""
    packed = _search(shared, tmp, "packed", ORDERS, ["uniform", "p2"],
                     {"pack": 6, "scheduler": "asha", "grace_steps": 5, "reduction_factor": 2})
    alone = _search(shared, tmp, "alone", [ALONE], ["uniform"], {"pack": 1})
    return packed, alone


def _trials(runs) -> dict:
    return {(r.data.params["curriculum.order"], r.data.params["loss.weighting"]): r for r in runs
            if r.data.tags.get("paceray.kind") == "trial"}


def test_a_pack_is_one_trial_whose_arms_are_runs_of_their_own(packed_and_alone):
    (result, (client, runs), _), _ = packed_and_alone
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
    (_, (client, runs), _), _ = packed_and_alone
    for (order, weighting), run in _trials(runs).items():
        if weighting == "uniform":
            drawn = history(client, run.info.run_id, "data/batches_drawn")
            assert drawn == [(5, 5.0), (10, 10.0)][:len(drawn)] and drawn, order


def test_arms_end_on_their_own_failed_stopped_or_finished(packed_and_alone):
    """In one pack: the non-finite arms FAILED with their reason; the arm scheduler's rung at step
    5 (three arms, rf 2: worse than the median stops) KILLED one, tagged; the rest FINISHED; the
    exit code and the scheduler's saved state say so."""
    import json

    (result, (client, runs), run_dir), _ = packed_and_alone
    arms = _trials(runs)
    for order in ORDERS:
        bad = arms[(order, "p2")]
        assert bad.info.status == "FAILED", order
        assert bad.data.tags["paceray.error"].startswith("non-finite loss"), bad.data.tags
    uniform = [arms[(order, "uniform")] for order in ORDERS]
    stopped = [r for r in uniform if r.info.status == "KILLED"]
    finished = [r for r in uniform if r.info.status == "FINISHED"]
    assert len(stopped) == 1 and len(finished) == 2, [r.info.status for r in uniform]
    assert stopped[0].data.tags["paceray.stopped_early"] == "asha" and "paceray.error" not in stopped[0].data.tags
    assert [s for s, _ in history(client, stopped[0].info.run_id, "eval/fid")] == [5]
    fid5 = {r.info.run_id: dict(history(client, r.info.run_id, "eval/fid"))[5] for r in uniform}
    assert fid5[stopped[0].info.run_id] == max(fid5.values())  # the worst at the rung
    for run in finished:
        assert [s for s, _ in history(client, run.info.run_id, "eval/fid")] == [5, 10]
    assert result.returncode != 0
    assert "paceray: error: 3 of 6 arm(s) failed, in 1 packed trial(s)" in result.stderr + result.stdout
    state = json.loads((run_dir / "searches" / "packed" / "arm_scheduler.json").read_text())
    assert list(state["recorded"]) == ["5"] and len(state["recorded"]["5"]) == 3


def test_an_arm_trains_exactly_as_its_trial_alone(packed_and_alone):
    """Same seed, same batches, timesteps, noise and initial weights: on the loop path (fp32, the
    same batch shapes and threads) every logged loss of the pack's fifth arm is equal bit for bit
    to its trial's alone, over the steps the arm ran (up to its stop, if the arm scheduler stopped
    it). One arm alone, not all three: each trial alone is a worker group of its own, ~30 s of the
    suite's wall. The FID to 1e-6 relative: each arm
    draws the images it draws alone (its own generator, seeded alike) and on CPU goes through the
    feature network alone, so it is equal here; on CUDA a pack's arms share one pass, a larger
    batch whose floating-point reduction order may differ in the last bits (tests/test_fid.py
    bounds that on real images)."""
    (_, (packed_client, packed_runs), _), (alone_result, (alone_client, alone_runs), _) = packed_and_alone
    assert alone_result.returncode == 0, alone_result.stdout[-3000:]
    packed, alone = _trials(packed_runs), _trials(alone_runs)
    assert len(alone) == 1 and all("paceray.pack" not in r.data.tags for r in alone.values())
    for order in [ALONE]:
        p, a = packed[(order, "uniform")], alone[(order, "uniform")]
        last = max(s for s, _ in history(packed_client, p.info.run_id, "train/loss"))
        for key in ("train/loss", "train/loss_c1", "curriculum/stage"):
            got, want = history(packed_client, p.info.run_id, key), history(alone_client, a.info.run_id, key)
            assert got == [(s, v) for s, v in want if s <= last], (order, key, got, want)
        got, want = history(packed_client, p.info.run_id, "eval/fid"), history(alone_client, a.info.run_id, "eval/fid")
        assert [s for s, _ in got] == [s for s, _ in want if s <= last]
        assert [v for _, v in got] == pytest.approx([v for s, v in want if s <= last], rel=1e-6), (order, got, want)


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


# ----------------------------------------------------------------- Optuna, packed

@prelaunched
def optuna_pack(shared, tmp):
    spec = write_spec(tmp / "optpack.yaml", "optpack",
                      tiny_base(train={"steps": 10, "log_every": 5, "batch_size": 16},
                                eval={"every": 10, "fid_samples": 16, "sampler_steps": 2, "batch_size": 16,
                                      "sample_grid": 0}, curriculum={"stage_steps": 2}),
                      search={"curriculum.num_clusters": {"randint": [2, 9]}},
                      tune={"algorithm": "optuna", "num_samples": 4, "pack": 2, "seed": 1})
    return shared.paceray("tune", spec, "--run-dir", tmp / "runs", check=False)


def test_optuna_packs_k_points_per_trial(optuna_pack, shared):
    assert optuna_pack.returncode == 0, optuna_pack.stdout[-3000:] + optuna_pack.stderr[-3000:]
    client, runs = experiment_runs(shared, "optpack")
    arms = [r for r in runs if r.data.tags.get("paceray.kind") == "trial"]
    assert len(arms) == 4 and all(r.info.status == "FINISHED" for r in arms)
    packs = {}
    for r in arms:
        packs.setdefault(r.data.tags["paceray.pack"], []).append(r)
    assert sorted(len(p) for p in packs.values()) == [2, 2]
    assert all(2 <= int(r.data.params["curriculum.num_clusters"]) < 9 for r in arms)
