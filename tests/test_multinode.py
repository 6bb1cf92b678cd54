"""Past one machine: a real multi-node Ray cluster (tests/nodes.py: a head, a worker node in a
network namespace on an address of its own), `ray job submit` of a packed search whose DDP trial
spans both nodes, and a node lost mid-search (the elastic trial on it finishes on the head beside
two trials it never touches, a fixed one fails in bounded time)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (REPO, checkpoint_step, experiment_runs, history, kill_session, start_paceray, tiny_base,
                      write_spec)
from nodes import Nodes
from paceray.tracking.server import LocalServer
from paceray.protocol.keys import NODES_TAG, PLACEMENT_TAG
from test_train_e2e import STEPS, TWO_WORKER_BASE, two_worker_trial  # noqa: F401 (the fixture, prelaunched once)

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]


class Cluster:
    """The module's cluster: a head (3 CPUs) and one worker node (1 CPU), and an MLflow server on the
    head's cluster address, which every node reaches."""

    def __init__(self, root: Path):
        self.nodes = Nodes(head_cpus=3)
        try:
            self.node = self.nodes.add_node(cpus=1)
            (root / "mlflow").mkdir()
            self.server = LocalServer(root / "mlflow", host=self.nodes.head_ip).start()
        except BaseException:
            self.nodes.stop()
            raise

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.server.uri)

    def args(self) -> list[str]:
        return ["--tracking-uri", self.server.uri, "--address", self.nodes.address]

    def stop(self) -> None:
        self.server.stop()
        self.nodes.stop()


@pytest.fixture(scope="module")
def cluster(storage, tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("multinode"))
    yield c
    c.stop()


def only_run(cluster: Cluster, experiment: str):
    exp = cluster.client().get_experiment_by_name(experiment)
    runs = cluster.client().search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def test_ray_job_submit_runs_a_packed_search_whose_ddp_trial_spans_two_nodes(cluster, two_worker_trial, tmp_path):
    """`ray job submit` to the multi-node head: a packed search (two curricula, `tune.pack: 2`)
    whose one Tune trial has two gloo ranks, one per node (strict-spread), training both arms in
    lockstep, each its own run with both nodes in its placement. The easy-to-hard arm's FID equals
    the same config's unpacked trial on one node (the shared cluster's two-worker `paceray train`,
    the same seed): packing and the second node change nothing it computes."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    spec = write_spec(tmp_path / "span.yaml", "span", TWO_WORKER_BASE,
                      search={"curriculum.order": {"grid": ["easy-to-hard", "none"]}}, tune={"pack": 2},
                      resources={"workers": 2, "cpus_per_worker": 1, "placement": "strict-spread"})
    runtime_env = {"env_vars": {"PACERAY_STORAGE": os.environ["PACERAY_STORAGE"]}}
    argv = [ray_bin, "job", "submit", "--address", cluster.nodes.jobs_address, "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps(runtime_env), "--",
            "paceray", "tune", str(spec), "--run-dir", str(tmp_path / "runs"), "--tracking-uri", cluster.server.uri]
    deadline = time.monotonic() + 120
    # The head's job agent comes up a while after its dashboard answers: Ray says to try again.
    while "No available agent to submit job" in (submit := subprocess.run(
            argv, capture_output=True, text=True, timeout=900, env={**os.environ, **cluster.nodes.env})).stderr:
        assert time.monotonic() < deadline, submit.stderr[-2000:] + cluster.nodes.head_logs()
        time.sleep(2)
    assert submit.returncode == 0 and "succeeded" in submit.stdout.lower(), submit.stdout[-5000:] + submit.stderr[-3000:]
    exp = cluster.client().get_experiment_by_name("span")
    arms = {r.data.params["curriculum.order"]: r for r in cluster.client().search_runs([exp.experiment_id])
            if r.data.tags.get("paceray.kind") == "trial"}
    assert sorted(arms) == ["easy-to-hard", "none"] and all(r.info.status == "FINISHED" for r in arms.values())
    packs = {r.data.tags["paceray.pack"] for r in arms.values()}
    assert len(packs) == 1 and {r.data.tags["paceray.trial_id"] for r in arms.values()} == {
        f"{next(iter(packs))}-a0", f"{next(iter(packs))}-a1"}
    for run in arms.values():
        ranks = json.loads(run.data.tags[PLACEMENT_TAG])
        assert sorted(p["rank"] for p in ranks) == [0, 1]
        assert len({p["node_id"] for p in ranks}) == 2 and run.data.tags[NODES_TAG] == "2"
        if cluster.nodes.isolated:  # the ranks talked across two addresses (gloo on each node's own interface)
            assert {p["ip"] for p in ranks} == {cluster.nodes.head_ip, cluster.node.ip}
    workers_log = (tmp_path / "runs/searches/span/workers.log").read_text()
    assert workers_log.count("2 rank(s) on 2 node(s)") >= 1
    _, _, shared = two_worker_trial
    client, runs = experiment_runs(shared, "two-workers")
    assert runs[0].data.params["curriculum.order"] == "easy-to-hard"
    one_node = dict(history(client, runs[0].info.run_id, "eval/fid"))[STEPS]
    two_nodes = dict(history(cluster.client(), arms["easy-to-hard"].info.run_id, "eval/fid"))[STEPS]
    assert two_nodes == pytest.approx(one_node, rel=1e-6, abs=1e-6)


def _registered_steps(trials: Path) -> dict[str, int]:
    """Per trial folder of a search, the step of the latest checkpoint Ray Train registered."""
    from paceray.base.errors import PacerayError
    from paceray.trial.trainer import latest_checkpoint

    steps = {}
    for trial_dir in trials.glob("*"):
        try:
            ckpt = latest_checkpoint(trial_dir)
        except PacerayError:  # Ray's snapshot caught mid-write (it rewrites it in place): not yet
            continue
        steps[trial_dir.name] = checkpoint_step(ckpt) if ckpt is not None else -1
    return steps


def _spanning_trial(workers_log: Path) -> str | None:
    """The Tune trial id whose worker group spans two nodes: its rank 0 says so, and its later
    lines name the trial (Ray prefixes both with the worker's pid)."""
    text = workers_log.read_text() if workers_log.exists() else ""
    for pid in re.findall(r"\(RayTrainWorker pid=(\d+)\) paceray: 2 rank\(s\) on 2 node\(s\)", text):
        found = re.search(rf"\(RayTrainWorker pid={pid}\) \[([\w-]+)\] step", text)
        if found:
            return found.group(1)
    return None


def test_a_lost_node_beside_other_trials_the_elastic_one_finishes_on_the_head_the_others_untouched(cluster, tmp_path):
    """A search of three elastic trials (2 workers strict-spread, min_workers 1) on a head of 3
    CPUs and a node of 1: one trial spans both nodes, the other two run one rank each on the head.
    Once that trial registered a checkpoint on two nodes, the node is SIGKILLed, never to return:
    the spanning trial resumes from its checkpoint on the head alone, in the same run; the other
    two never restart; every run has every step once. A fixed trial (strict-spread, no
    min_workers) started once the node is gone cannot be placed: Ray Train alone would retry for
    ever; it fails in one line after resources.worker_wait_s. (The module's last test: its node
    stays dead.) Ray Train's own elastic policy counts workers by free CPUs, blind to
    strict-spread: on the head's 3 CPUs it asked for 2 ranks for ever after the kill
    (paceray.cluster.ray_internals.one_rank_per_node_policy)."""
    base = tiny_base(train={"steps": 60, "log_every": 5}, eval={"every": 10, "fid_samples": 32})
    resources = {"workers": 2, "cpus_per_worker": 1, "max_failures": 3, "placement": "strict-spread"}
    elastic = write_spec(tmp_path / "el.yaml", "elastic", base, resources={**resources, "min_workers": 1},
                         search={"curriculum.order": {"grid": ["easy-to-hard", "none", "hard-to-easy"]}})
    fixed = write_spec(tmp_path / "fixed.yaml", "fixed", base, resources={**resources, "worker_wait_s": 10})
    env = {**cluster.nodes.command_env(), "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5",
           "PACERAY_ELASTIC_RESIZE_INTERVAL": "5"}
    run_dir = tmp_path / "runs"
    workers_log, trials = run_dir / "searches/elastic/workers.log", run_dir / "ray/elastic/trials"
    proc = start_paceray("tune", elastic, "--run-dir", run_dir, *cluster.args(), log=tmp_path / "elastic.log", env=env)
    other = None
    try:
        # Elastic trials start on what Ray reports free at that moment and grow at their next
        # resize check (5 s here): the kill waits for the two-node group, then for a checkpoint of
        # every trial registered after it.
        deadline = time.monotonic() + 600
        while (spanning := _spanning_trial(workers_log)) is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.output()[-3000:]
            time.sleep(0.2)
        before = _registered_steps(trials).get(f"trial-{spanning}", -1)
        while _registered_steps(trials).get(f"trial-{spanning}", -1) <= before:
            assert proc.poll() is None and time.monotonic() < deadline, proc.output()[-3000:]
            time.sleep(0.2)
        cluster.nodes.kill_node(cluster.node)
        started = time.monotonic()
        other = start_paceray("train", fixed, "--run-dir", tmp_path / "fixed-runs", *cluster.args(),
                              log=tmp_path / "fixed.log", env=env)
        fixed_out = other.finish(timeout=300)
        took = time.monotonic() - started
        out = proc.finish(timeout=900)
    finally:
        for p in (proc, other):
            if p is not None and p.poll() is None:
                kill_session(p.pid)
    # the fixed trial: one line, its run FAILED, in bounded time
    assert other.returncode != 0
    errors = [line for line in fixed_out.splitlines() if line.startswith("paceray: error:")]
    assert len(errors) == 1 and errors[0].startswith("paceray: error: trial fixed-") and \
        "could not be placed within resources.worker_wait_s (10 s)" in errors[0], fixed_out[-3000:]
    assert took < 120, took
    assert only_run(cluster, "fixed").info.status == "FAILED"
    # the search: the spanning trial resumed once on the head, the other two never restarted
    assert proc.returncode == 0, out[-5000:]
    log = workers_log.read_text()
    resumed = re.findall(r"\[([\w-]+)\] resumed from the checkpoint at step", log)
    assert set(resumed) == {spanning}, log[-5000:]  # (also when it grew to two nodes, from a checkpoint)
    assert "left undelivered" not in out  # the lost node held no queue; the head's were delivered
    exp = cluster.client().get_experiment_by_name("elastic")
    runs = [r for r in cluster.client().search_runs([exp.experiment_id]) if r.data.tags.get("paceray.kind") == "trial"]
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    for run in runs:
        ranks = json.loads(run.data.tags[PLACEMENT_TAG])
        assert len(ranks) == 1 and run.data.tags[NODES_TAG] == "1"  # each finished on the head alone
        losses = [s for s, _ in history(cluster.client(), run.info.run_id, "train/loss")]
        assert losses == list(range(5, 61, 5)), (run.data.tags["paceray.trial_id"], losses)  # every step once
