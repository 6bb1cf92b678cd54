"""Where a trial's ranks run, without a cluster: the process group's interface, the bounded wait
for a worker group, elastic trials in the concurrency count, the run's placement tags, the
tracking store a multi-node cluster can reach."""

from __future__ import annotations

import json
import types

import pytest

from paceray.cluster import ray_internals
from paceray.cluster import connect as raycluster
from paceray.cluster import placement
from paceray.trial import trainer as trial
from paceray.base.errors import PacerayError
from paceray.spec.specfile import ResourcesSection


@pytest.fixture
def clean_ifname_env(monkeypatch):
    """The interface variables unset, and unset again afterwards: choose_socket_ifname writes
    os.environ itself, and a `lo` left there reaches every Ray node a later test starts (its
    gloo then advertises loopback to other nodes)."""
    for var in ray_internals.SOCKET_IFNAME_VARS:
        monkeypatch.setenv(var, "")  # recorded first, so teardown restores what was there
        monkeypatch.delenv(var)
    return monkeypatch


def test_the_process_group_uses_the_interface_of_the_node_address(clean_ifname_env):
    import os

    import ray.util

    clean_ifname_env.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    assert ray_internals.choose_socket_ifname(None) == "lo"
    assert all(os.environ[v] == "lo" for v in ray_internals.SOCKET_IFNAME_VARS)


def test_a_users_interface_on_the_node_wins_over_the_guess_and_the_spec_over_both(clean_ifname_env):
    import os

    import ray.util

    clean_ifname_env.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    clean_ifname_env.setenv("GLOO_SOCKET_IFNAME", "eth7")
    ray_internals.choose_socket_ifname(None)
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth7" and os.environ["NCCL_SOCKET_IFNAME"] == "lo"
    assert ray_internals.choose_socket_ifname("ib0") == "ib0"
    assert all(os.environ[v] == "ib0" for v in ray_internals.SOCKET_IFNAME_VARS)


def test_an_address_on_no_local_interface_leaves_the_choice_to_gloo_and_nccl(clean_ifname_env):
    import os

    import ray.util

    clean_ifname_env.setattr(ray.util, "get_node_ip_address", lambda: "203.0.113.9")  # TEST-NET-3: nobody's
    assert ray_internals.choose_socket_ifname(None) is None
    assert not any(os.environ.get(v) for v in ray_internals.SOCKET_IFNAME_VARS)


def test_the_node_aware_config_is_ray_trains_torch_config_with_its_backend():
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    config = ray_internals.node_aware_torch_config("gloo", "eth0")
    assert isinstance(config, TorchConfig) and config.backend == "gloo" and config.socket_ifname == "eth0"
    assert issubclass(config.backend_cls, _TorchBackend)


@pytest.mark.parametrize("wait, per_try, retries", [(600, None, 9), (20, "10", 1), (5, "10", 0), (61, None, 1)])
def test_the_wait_for_a_worker_group_bounds_ray_trains_retries(monkeypatch, wait, per_try, retries):
    if per_try is None:
        monkeypatch.delenv(trial.GROUP_START_TIMEOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(trial.GROUP_START_TIMEOUT_ENV, per_try)
    assert trial._group_start_retries(wait) == retries


def test_a_trainer_gets_the_placement_elasticity_and_bounded_retries(tmp_path):
    from paceray.protocol import TrialContext
    from paceray.spec.registry import resolve

    context = TrialContext(trial_id="t", run_id=None, tracking_uri=None, storage=str(tmp_path), run_dir=str(tmp_path),
                           metric="eval/fid")
    resources = ResourcesSection(workers=4, min_workers=2, placement="strict-spread", socket_ifname="eth0",
                                 worker_wait_s=120)
    plan = trial.FitPlan(resolve("denoiser"), {"train": {"checkpoint_keep": 2}}, resources, tmp_path, "t", context={})
    t = trial.trainer_for(plan, context)
    assert t.scaling_config.num_workers == (2, 4) and t.scaling_config.placement_strategy == "STRICT_SPREAD"
    assert t.run_config.failure_config.controller_failure_limit == 1  # 2 tries of Ray's 60 s
    assert t.backend_config.socket_ifname == "eth0"


def test_an_elastic_trial_counts_at_its_minimum_for_concurrency(tmp_path):
    from paceray.spec.specfile import load
    from paceray.search.tuner import max_concurrent

    p = tmp_path / "s.yaml"
    p.write_text("name: s\ntrainable: denoiser\nresources: {workers: 4, min_workers: 2, cpus_per_worker: 1}\n")
    assert max_concurrent(load(p), {"CPU": 4}) == 2
    p.write_text("name: s\ntrainable: denoiser\nresources: {workers: 4, cpus_per_worker: 1}\n")
    assert max_concurrent(load(p), {"CPU": 4}) == 1


def test_the_run_records_where_the_last_worker_group_ran():
    ranks = [{"rank": 0, "node_id": "a", "ip": "10.0.0.1"}, {"rank": 1, "node_id": "b", "ip": "10.0.0.2"}]
    result = types.SimpleNamespace(return_value={placement.PLACEMENT_KEY: ranks})
    tags = placement.placement_tags(result)
    assert json.loads(tags[placement.PLACEMENT_TAG]) == ranks and tags[placement.NODES_TAG] == "2"
    assert placement.placement_tags(types.SimpleNamespace(return_value=None)) == {}


@pytest.mark.parametrize("uri, refused", [(None, "the embedded MLflow store"),
                                          ("http://127.0.0.1:5000", "loopback"),
                                          ("http://mlflow.paceray:5000", None)])
def test_a_multi_node_cluster_needs_a_tracking_store_every_node_reaches(monkeypatch, uri, refused):
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeManagerAddress": "10.0.0.1"},
                                              {"Alive": True, "NodeManagerAddress": "10.0.0.2"},
                                              {"Alive": False, "NodeManagerAddress": "10.0.0.3"}])
    if refused is None:
        raycluster.check_tracking_reach(uri)
    else:
        with pytest.raises(PacerayError, match=refused) as e:
            raycluster.check_tracking_reach(uri)
        assert "2 nodes" in str(e.value) and "--tracking-uri" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeManagerAddress": "10.0.0.1"}])
    raycluster.check_tracking_reach(None)  # one node: the embedded store is fine
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeManagerAddress": "127.0.0.1"}] * 3)
    raycluster.check_tracking_reach(None)  # several raylets on this machine's loopback reach it too
    monkeypatch.setattr(raycluster, "_on_this_machine", lambda address: address == "10.0.0.1")
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeManagerAddress": "10.0.0.1"}] * 2)
    raycluster.check_tracking_reach(None)  # ... and on this machine's own address


def test_a_worker_group_never_placed_is_one_line_naming_the_wait():
    ray_text = ("Training failed due to controller error:\nThe worker group startup timed out after 10.0 seconds "
                "waiting for 3 workers. Potential causes include: (1) temporary insufficient cluster resources")
    line = placement.placement_failure(RuntimeError(ray_text), ResourcesSection(workers=3, worker_wait_s=20))
    assert line.startswith("its worker group (3 worker(s) × 1 CPU) could not be placed within resources.worker_wait_s (20 s)")
    assert "\n" not in line
    assert placement.placement_failure(RuntimeError("ValueError: a worker's own error"), ResourcesSection()) is None


HEAD = {"Alive": True, "Resources": {"CPU": 4.0, "node:__internal_head__": 1.0}}


@pytest.mark.parametrize("added, max_cluster, expected, source", [
    (None, None, {"CPU": 4.0}, raycluster.PRESENT),
    (None, {"CPU": 12, "GPU": 8}, {"CPU": 12.0, "GPU": 8.0}, "resources.max_cluster"),
    ({"CPU": 32.0, "GPU": 4.0}, {"GPU": 1}, {"CPU": 36.0, "GPU": 4.0}, "the autoscaler's maximum"),
    (None, {"CPU": 2}, {"CPU": 4.0}, "resources.max_cluster"),  # never less than what is present
])
def test_an_autoscaling_cluster_is_sized_by_what_it_can_grow_to(monkeypatch, added, max_cluster, expected, source):
    """The autoscaler's maximum (the head's resources plus what it can add) wins over the spec's
    max_cluster, which wins over the resources present; none is taken below what is present."""
    import ray

    from paceray.cluster import ray_internals

    monkeypatch.setattr(raycluster, "cluster_resources", lambda: {"CPU": 4.0, "memory": 1e9})
    monkeypatch.setattr(ray_internals, "autoscaler_max_resources", lambda: added)
    monkeypatch.setattr(ray, "nodes", lambda: [HEAD, {"Alive": True, "Resources": {"CPU": 8.0}}])
    capacity, said = raycluster.cluster_capacity(max_cluster)
    assert {k: v for k, v in capacity.items() if k in ("CPU", "GPU") and v} == expected and said == source


def test_a_gpu_trial_on_a_cluster_with_no_gpu_yet_says_how_to_size_it(tmp_path):
    from paceray.spec.specfile import load
    from paceray.search.tuner import max_concurrent

    p = tmp_path / "s.yaml"
    p.write_text("name: s\ntrainable: denoiser\nresources: {workers: 2, gpus_per_worker: 1}\n")
    with pytest.raises(PacerayError, match="set resources.max_cluster") as e:
        max_concurrent(load(p), {"CPU": 4}, raycluster.PRESENT)
    assert "\n" not in str(e.value)
    assert max_concurrent(load(p), {"CPU": 16, "GPU": 8}, "resources.max_cluster") == 4
    p.write_text("name: s\ntrainable: denoiser\nresources: {workers: 2, gpus_per_worker: 1, max_cluster: {TPU: 4}}\n")
    with pytest.raises(PacerayError, match="max_cluster"):
        load(p)
