"""`paceray tune` for real: Ray Tune over Ray Train trials, nested MLflow runs, report, resume,
ASHA, and `ray job submit` to a real local Ray head."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, experiment_runs, history, kill_session, prelaunched

pytestmark = pytest.mark.slow

# quick.yaml, shortened: the four orders, 30 steps, evals at 15 and 30; packed (tune.pack auto: two
# packs of two orders on the shared cluster's 2 CPUs) unless a test pins tune.pack=1.
SHORT = ["--set", "train.steps=30", "--set", "eval.every=15", "--set", "curriculum.stage_steps=6",
         "--set", "eval.fid_samples=32", "--set", "eval.sampler_steps=4", "--set", "train.log_every=5"]


def search_runs(where, experiment: str = "quick"):
    client, runs = experiment_runs(where, experiment)
    parents = [r for r in runs if r.data.tags.get("paceray.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("paceray.kind") == "trial"]
    return client, parents, children


def artifact_dir(run) -> Path:
    return Path(run.info.artifact_uri.removeprefix("file://"))


@prelaunched
def quick_search(shared, tmp):
    run_dir = tmp / "runs"
    result = shared.paceray("tune", REPO / "search_spaces/quick.yaml", "--run-dir", run_dir, *SHORT)
    return run_dir, result, shared


def test_search_makes_one_parent_and_a_child_per_order(quick_search):
    run_dir, result, shared = quick_search
    client, parents, children = search_runs(shared)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.params["curriculum.order"] for c in children) == sorted(
        ["none", "easy-to-hard", "hard-to-easy", "random"])
    assert len({c.data.tags["paceray.trial_id"] for c in children}) == 4
    assert len({c.data.tags["paceray.pack"] for c in children}) == 2  # two packs of two arms
    for child in children:
        assert child.info.status == "FINISHED"
        assert [s for s, _ in history(client, child.info.run_id, "eval/fid")] == [15, 30]
    assert parent.data.params["search.curriculum.order"].startswith("grid")
    # the parent holds the spec, the trial table, the plots, the best config and the best model
    art = artifact_dir(parent)
    for rel in ("spec/spec.yaml", "spec/resolved.yaml", "report/trials.csv", "report/fid_by_order.png", "report/report.html",
                "report/fid_by_clusters.png", "best/config.json", "best/pipeline/model_index.json"):
        assert (art / rel).is_file(), rel
    assert parent.data.tags["paceray.best_trial"] in {c.data.tags["paceray.trial_id"] for c in children}
    assert "best trial" in result.stdout
    assert f"the report as one page: {art / 'report/report.html'}" in result.stdout
    # the best model is a version of the registered model named after the search, linked to it
    name, version = parent.data.tags["paceray.model_version"].split("/")
    registered = client.get_model_version(name, version)
    assert name == "quick" and registered.run_id == parent.info.run_id
    assert registered.source == f"runs:/{parent.info.run_id}/best/pipeline"
    assert registered.tags["paceray.trial_id"] in {c.data.tags["paceray.trial_id"] for c in children}
    assert f"best model registered: models:/quick/{version}" in result.stdout


def test_search_progress_is_one_plain_line_per_trial_event_and_no_worker_lines(quick_search):
    # Off a terminal (here: a file), the live view is one line per trial event; Ray's worker
    # output goes to the log file it names.
    import re

    run_dir, result, shared = quick_search
    lines = result.stdout.splitlines()
    events = [line for line in lines if re.match(r"\[\d+:\d\d\] trial ", line)]
    # two packed trials of two arms each: the live view's rows are Tune's trials
    assert sum(" started · " in line for line in events) == 2, events
    assert all("(a pack of 2 arms)" in line for line in events), events
    assert len([line for line in events if re.search(r" at step (15|30)/30: stage \d+ · FID \d+\.?\d* · ", line)]) == 4
    assert sum(" finished at step 30/30 · " in line for line in events) == 2
    assert events[-1].endswith(" · 2/2 done")
    assert len(events) == 8
    assert not [line for line in lines + result.stderr.splitlines() if re.match(r"\(\w+ pid=\d+", line)]
    log = run_dir / "searches/quick/workers.log"
    assert f"Ray's worker output goes to {log}" in result.stdout
    assert re.search(r"^\(RayTrainWorker pid=\d+\) ", log.read_text(), re.M)
    assert re.search(r"^search quick: 2 finished, 0 running, 0 stopped, 0 failed, 0 pending · best eval/fid ", result.stdout, re.M)


def test_best_model_loads_as_a_diffusers_pipeline(quick_search):
    from diffusers import DDPMPipeline

    run_dir, _, shared = quick_search
    _, parents, _ = search_runs(shared)
    pipe = DDPMPipeline.from_pretrained(artifact_dir(parents[0]) / "best/pipeline")
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 8, 8, 1)


def test_report_lists_the_trials(quick_search):
    run_dir, _, shared = quick_search
    out = run_dir.parent / "report"
    r = shared.paceray("report", "quick", "--out", out)
    for order in ("none", "easy-to-hard", "hard-to-easy", "random"):
        assert order in r.stdout
    assert "classifier:digits" in r.stdout and "32 samples" in r.stdout
    assert (out / "trials.csv").read_text().count("\n") == 5


# ----------------------------------------------------------------- resume after a killed driver


def _finished_children(shared, experiment: str) -> int:
    _, _, children = search_runs(shared, experiment)
    return sum(c.info.status == "FINISHED" for c in children)


@prelaunched(long=True)
def killed_search(shared, tmp_path):
    """Two trials one at a time (quick.yaml's `none` and `easy-to-hard`) on the shared cluster; a
    second command started on the live search; the driver SIGKILLed after the first trial
    finished (a lost laptop, a killed job); then `--resume`."""
    import yaml

    spec = yaml.safe_load((REPO / "search_spaces/quick.yaml").read_text())
    spec["name"] = "killed"
    spec["search"]["curriculum.order"] = {"grid": ["none", "easy-to-hard"]}
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "runs"
    # Tune trials themselves are under test here: one arm each (tune.pack 1).
    args = ["--run-dir", run_dir, *SHORT, "--set", "tune.max_concurrent=1", "--set", "tune.pack=1"]
    proc = shared.start("tune", path, *args, log=tmp_path / "tune.log")
    try:
        deadline = time.monotonic() + 600
        while not (run_dir / "searches" / "killed" / "search.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.output()[-3000:]
            time.sleep(0.2)
        # A second command on the live search: one line, before it starts Ray or touches anything.
        second = shared.paceray("tune", path, *args, check=False)
        while not _finished_children(shared, "killed") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
    finally:
        kill_session(proc.pid)  # the driver: Ray ends its trials' actors when it sees it gone
        proc.wait(timeout=60)
    shared.wait_until_job_gone(proc.pid)
    folders = [p.name for p in (run_dir / "ray").iterdir()]
    _, _, before = search_runs(shared, "killed")
    finished_before = {c.data.tags["paceray.trial_id"]: c.info.end_time for c in before if c.info.status == "FINISHED"}
    shared.paceray("tune", path, *args, "--resume")
    return {"second": second, "folders": folders, "finished_before": finished_before}


def test_killed_search_resumes_without_rerunning_finished_trials(killed_search, shared):
    second, finished_before = killed_search["second"], killed_search["finished_before"]
    assert second.returncode == 2 and "the search 'killed'" in second.stderr and "is already running" in \
        second.stderr and second.stderr.count("\n") == 1, second.stderr[-2000:]
    assert killed_search["folders"] == ["killed"]  # the live search's folder kept its name
    assert len(finished_before) == 1
    client, parents, children = search_runs(shared, "killed")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    ids = [c.data.tags["paceray.trial_id"] for c in children]
    assert len(ids) == 2 == len(set(ids)), ids  # exactly one child run per trial
    assert all(c.info.status == "FINISHED" for c in children)
    for c in children:
        tid = c.data.tags["paceray.trial_id"]
        if tid in finished_before:  # not rerun: its run was not touched again
            assert c.info.end_time == finished_before[tid]
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")]
        assert sorted(steps) == sorted(set(steps)) == list(range(5, 31, 5))


# ----------------------------------------------------------------- ASHA


@prelaunched
def asha_search(shared, tmp_path):
    """One trial learns (lr 2e-3); one barely moves (lr 1e-7) and keeps FIDs far above it.
    Trials run one at a time, the strong one first (grid order), so when the weak trial reaches
    the first rung (2 evals after the curriculum shows every timestep at step 19: step 79, seen at
    the eval of step 90; by then lr 2e-3 has clearly learned) ASHA compares it with
    the FID the strong one recorded there (ASHA's 1/2 quantile of one value, reduction factor 2).
    It is far worse, so it stops (one more eval may land while the stop travels)."""
    import yaml

    spec = yaml.safe_load((REPO / "search_spaces/quick.yaml").read_text())
    spec["name"] = "asha"
    spec["base"]["curriculum"]["order"] = "easy-to-hard"
    spec["search"] = {"train.lr": {"grid": [0.002, 1.0e-7]}}
    spec["tune"] = {"scheduler": "asha", "grace_evals": 2, "reduction_factor": 2, "max_concurrent": 1}
    path = tmp_path / "asha.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "runs"
    # 300 steps: long enough after the first rung for Tune's stop to reach a weak trial mid-run.
    shared.paceray("tune", path, "--run-dir", run_dir, *SHORT, "--set", "train.steps=300", "--set", "eval.every=30")


def test_asha_stops_the_weak_trials(asha_search, shared):
    client, parents, children = search_runs(shared, "asha")
    assert len(children) == 2
    last_step: dict[str, list[int]] = {}
    for c in children:
        steps = [s for s, _ in history(client, c.info.run_id, "eval/fid")]
        last_step.setdefault(c.data.params["train.lr"], []).append(max(steps))
    assert last_step["0.002"] == [300]  # the strong trial trains to the end
    # stopped early: the decision comes at the first rung (step 90); how many evals land before
    # the stop reaches the worker depends on the machine's load
    assert all(s < 300 for s in last_step["1e-07"]), last_step
    stopped = [c for c in children if c.data.params["train.lr"] == "1e-07"]
    seen = [(c.info.status, c.data.tags.get("paceray.stopped_early"), c.data.tags.get("paceray.error")) for c in stopped]
    assert all(s == ("KILLED", "asha", None) for s in seen), seen
    strong = next(c for c in children if c.data.params["train.lr"] == "0.002")
    assert strong.info.status == "FINISHED" and "paceray.stopped_early" not in strong.data.tags
    # tune.max_concurrent 1 held: the weak trial's run began after the strong one's ended
    assert all(strong.info.end_time <= c.info.start_time for c in stopped)


# ----------------------------------------------------------------- seeds as replicates


@prelaunched
def seeded_search(shared, tmp_path):
    """Arms as a list (order none, easy-to-hard, and SpeeD: order none with its sampling and its
    weighting) crossed with a grid over N and with `tune.seeds: [0, 1]`: the baseline and SpeeD
    run once per seed (N means nothing to them), easy-to-hard once per N and seed; the report
    pairs them by seed."""
    import yaml

    spec = yaml.safe_load((REPO / "search_spaces/quick.yaml").read_text())
    spec["name"] = "seeded"
    spec["search"] = {"curriculum.num_clusters": {"grid": [2, 4]}}
    spec["arms"] = [{"curriculum.order": "none"}, {"curriculum.order": "easy-to-hard"},
                    {"curriculum.order": "none", "curriculum.distribution": "speed", "loss.weighting": "speed"}]
    spec["tune"] = {"seeds": [0, 1], "pack": "auto"}  # packed: each seed's four arms in one trial
    path = tmp_path / "seeded.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "runs"
    return shared.paceray("tune", path, "--run-dir", run_dir, *SHORT, "--set", "train.steps=10",
                          "--set", "eval.every=5", "--set", "curriculum.stage_steps=2")


SPEED_ARM = "none speed timesteps speed weighting"


def test_seeds_replicate_every_arm_and_none_runs_once_per_seed(seeded_search, shared):
    client, parents, children = search_runs(shared, "seeded")
    arms = sorted((c.data.params["curriculum.order"], c.data.params["curriculum.num_clusters"],
                   c.data.params["curriculum.distribution"], c.data.params["loss.weighting"],
                   c.data.params["train.seed"]) for c in children)
    assert arms == sorted([("none", "4", "uniform", "uniform", s) for s in "01"]
                          + [("easy-to-hard", n, "uniform", "uniform", s) for n in "24" for s in "01"]
                          + [("none", "4", "speed", "speed", s) for s in "01"])
    assert all(c.info.status == "FINISHED" for c in children), [c.data.tags.get("paceray.error") for c in children]
    labels = sorted(c.data.tags["paceray.arm"] for c in children)
    assert labels == sorted(["none", "easy-to-hard N=2", "easy-to-hard N=4", SPEED_ARM] * 2)
    packs: dict = {}
    for c in children:  # packed by seed: each seed's four arms in one trial, never two seeds in one
        packs.setdefault(c.data.tags["paceray.pack"], set()).add(c.data.params["train.seed"])
    assert sorted(packs.values(), key=sorted) == [{"0"}, {"1"}]
    out = seeded_search.stdout
    assert "easy-to-hard N=2" in out and "easy-to-hard N=4" in out and SPEED_ARM in out
    assert "paired by seed against order=none" in out and "(2 seeds: 0;1)" in out


def test_a_seeded_search_reports_steps_to_target_and_groups_its_runs_by_arm(seeded_search, shared):
    """The report's steps-to-target (each seed's baseline final FID) with its interval, for the
    SpeeD arm too; the MLflow view groups the 8 runs into their 4 arms."""
    import base64
    import json
    import zlib

    import pandas as pd

    from paceray.tracking import ui_view

    client, parents, children = search_runs(shared, "seeded")
    (parent,) = parents
    summary = pd.read_csv(artifact_dir(parent) / "report" / "summary.csv").set_index("arm")
    speed = summary.loc[SPEED_ARM]
    assert speed["n"] == 2 and speed["steps_ratio_pairs"] == 2
    assert speed["steps_ratio_ci_low"] <= speed["steps_ratio"] <= speed["steps_ratio_ci_high"]
    assert {"steps_ratio_censored", "delta_fid_mean"} <= set(summary.columns)
    experiment = client.get_experiment(parent.info.experiment_id)
    value = json.loads(experiment.tags[ui_view.SHARED_VIEW_PREFIX + parent.data.tags["paceray.ui_view"]])
    state = json.loads(zlib.decompress(base64.b64decode(value["state"].removeprefix("deflate;"))))
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "paceray.arm"}]
    assert "params.`curriculum.order`" in state["selectedColumns"]


# ----------------------------------------------------------------- ray job submit


@prelaunched
def job_search(shared, tmp_path):
    """`ray job submit` to the shared head: a real `ray start --head` with token authentication on,
    as README's commands and the cluster run it (the token comes from the environment, so the test
    writes nothing under ~/.ray)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**shared.base_env, **shared.env, "PATH": f"{Path(sys.executable).parent}:{shared.base_env['PATH']}"}
    env.pop("RAY_ADDRESS")
    address = shared.jobs_address
    run_dir = tmp_path / "runs"
    deadline = time.monotonic() + 120  # the dashboard's Jobs API comes up after the GCS
    while (r := subprocess.run([ray_bin, "job", "list", "--address", address], capture_output=True, text=True,
                               env=env)).returncode != 0 and time.monotonic() < deadline:
        time.sleep(2)
    wrong = subprocess.run([ray_bin, "job", "list", "--address", address], capture_output=True, text=True,
                           env={**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    runtime_env = {"env_vars": {"PACERAY_STORAGE": shared.base_env["PACERAY_STORAGE"]}}
    # The Jobs API may answer before the head's dashboard agent has registered; a submission then is
    # refused (500, "No available agent to submit job, please try again later") and starts nothing,
    # so it is tried again, as Ray's message says.
    deadline = time.monotonic() + 180
    while True:
        submit = subprocess.run(
            [ray_bin, "job", "submit", "--address", address, "--working-dir", str(REPO),
             "--runtime-env-json", json.dumps(runtime_env), "--",
             "paceray", "tune", "search_spaces/quick.yaml", "--run-dir", str(run_dir), *SHORT,
             # One trial (--set pins the searched order): the job path is under test here; the
             # four-trial search is test_search_makes_one_parent_and_a_child_per_order's.
             "--set", "curriculum.order=easy-to-hard"],
            capture_output=True, text=True, timeout=900, env=env)
        if "No available agent to submit job" not in submit.stdout + submit.stderr or time.monotonic() > deadline:
            break
        time.sleep(5)
    return r, wrong, submit, run_dir


def test_ray_job_submit_to_a_local_head(job_search, shared):
    r, wrong, submit, run_dir = job_search
    assert r.returncode == 0, r.stderr[-3000:]
    assert wrong.returncode != 0  # the Jobs API refuses another token
    assert submit.returncode == 0, submit.stdout[-5000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout.lower()
    _, parents, children = search_runs(run_dir)  # the job's own embedded store, under --run-dir
    assert len(parents) == 1 and len(children) == 1
    assert all(c.info.status == "FINISHED" for c in children)
    # nothing landed in the job's ephemeral copy of the working dir
    copies = list(shared.temp.glob("session_*/runtime_resources/working_dir_files/*"))
    assert copies and not any((c / "runs").exists() for c in copies)
