"""An autoscaling Ray cluster on this machine: a real `ray start --head --autoscaling-config` with
Ray's own (v1) autoscaler and its fake multi-node provider, which starts each node it adds as a
real raylet on this machine. A search sized by what the cluster can grow to runs a trial that
does not fit what is present, its second rank on the node the autoscaler adds while it runs."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import experiment_runs, kill_session, start_paceray, tiny_base, write_spec
from nodes import RAY, alive_nodes
from paceray.tracking.server import free_port
from paceray.cluster.ray_internals import SINGLE_NODE_ENV
from paceray.protocol.keys import PLACEMENT_TAG

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]

def autoscaling_config(gcs_address: str, head_cpus: int, node_cpus: int, max_nodes: int) -> dict:
    """Ray's cluster config for its fake multi-node provider (the fields Ray's own example has)."""
    return {
        "cluster_name": "paceray-test", "max_workers": max_nodes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            "cpu": {"resources": {"CPU": node_cpus}, "node_config": {}, "min_workers": 0, "max_workers": max_nodes},
        },
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


class AutoscalingHead:
    """The head (1 CPU) and its autoscaler, which may add one 1-CPU node; all on loopback (the
    provider's nodes join the head's address), every process in the head's session."""

    def __init__(self):
        self.temp = Path(tempfile.mkdtemp(prefix="ras", dir="/tmp"))  # Ray's socket paths stay short
        port, dashboard = free_port(), free_port()
        self.address = f"127.0.0.1:{port}"
        self.dashboard = f"http://127.0.0.1:{dashboard}"  # Ray's state API (`ray list nodes`)
        (self.temp / "cluster.json").write_text(json.dumps(autoscaling_config(self.address, 1, 1, 1)))
        # Single-node mode keeps every process on 127.0.0.1; the provider starts its nodes from
        # the head's autoscaler (not `ray start --address`, which would refuse to join).
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), SINGLE_NODE_ENV: "0",
                    "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0", "OMP_NUM_THREADS": "1",
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
             f"--autoscaling-config={self.temp / 'cluster.json'}", "--num-cpus", "1", "--include-dashboard", "true",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
             "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(self.temp / "ray")],
            stdout=open(self.temp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **self.env})
        try:
            deadline = time.monotonic() + 120
            while not self.alive_nodes():
                assert self.proc.poll() is None, (self.temp / "head.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the autoscaling head did not come up in 120 s"
                time.sleep(1)
        except BaseException:
            self.stop()
            raise

    def alive_nodes(self) -> list[dict]:
        return alive_nodes(self.dashboard, self.env)

    def stop(self) -> None:
        import shutil

        kill_session(self.proc.pid)  # the head, its autoscaler and every node the autoscaler started
        self.proc.wait(timeout=30)
        shutil.rmtree(self.temp, ignore_errors=True)


def test_a_search_sized_by_what_the_cluster_can_grow_to_runs_on_the_node_the_autoscaler_adds(storage, tmp_path):
    """One 1-CPU head that may grow by one 1-CPU node, and a trial of two 1-CPU workers:
    sized by the resources present (1 CPU) the search would refuse it; with
    `resources.max_cluster: {CPU: 2}` (Ray's v1 autoscaler does not report its maximum) it runs,
    its worker group waits for the node the autoscaler adds while the search runs, and its two
    gloo ranks train on the head and on that node."""
    head = AutoscalingHead()
    try:
        [only] = head.alive_nodes()  # the search starts on the head alone
        spec = write_spec(tmp_path / "grow.yaml", "grow", tiny_base(train={"steps": 30}, eval={"every": 30, "fid_samples": 32}),
                          resources={"workers": 2, "cpus_per_worker": 1, "max_cluster": {"CPU": 2}})
        proc = start_paceray("tune", spec, "--run-dir", tmp_path / "runs", "--address", head.address,
                             log=tmp_path / "tune.log", env={**head.env, "RAY_ADDRESS": head.address})
        try:
            out = proc.finish(timeout=600)
        finally:
            if proc.poll() is None:
                kill_session(proc.pid)
        assert proc.returncode == 0, out[-5000:]
        assert "paceray: up to 1 trial(s) at once: the cluster can grow to CPU=2 (resources.max_cluster)" in out, out[-3000:]
        nodes = head.alive_nodes()
    finally:
        head.stop()
    assert len(nodes) == 2  # the autoscaler added one while the search ran
    _, runs = experiment_runs(tmp_path / "runs", "grow")
    [trial] = [r for r in runs if r.data.tags.get("paceray.kind") == "trial"]
    assert trial.info.status == "FINISHED"
    ran_on = {rank["node_id"] for rank in json.loads(trial.data.tags[PLACEMENT_TAG])}
    assert len(ran_on) == 2 and only["node_id"] in ran_on  # a rank on the head, one on the added node
