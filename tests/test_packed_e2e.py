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
