"""The trainable protocol: the platform is domain-free (checked mechanically), trainables reach
the platform only through paceray.protocol, discovery works by entry point and by dotted path,
and the one Ray internal paceray reads is still where it was."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from paceray.spec import registry
from paceray.base.errors import PacerayError
from paceray.protocol import Trainable
from paceray.base.dotted import flatten

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform" / "paceray"
DENOISER = REPO / "trainables" / "denoiser"


def _strings(path: Path) -> list[tuple[str, int]]:
    """Every string constant of a module (docstrings and f-string text included), with its line."""
    return [(node.value, node.lineno) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def _subscript_keys(path: Path) -> list[tuple[str, int]]:
    """Keys read as `x["key"]` or `x.get("key")`: how code reaches into someone's config."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            out.append((node.slice.value, node.lineno))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.args[0].value, node.lineno))
    return out


def denoiser_names() -> dict[str, set[str]]:
    """The denoiser's config paths and section/field names, the metrics it logs, the tags it sets."""
    from paceray import protocol
    from paceray.tracking import client as tracking
    from trainables.denoiser.config import Config

    paths = set(flatten(Config().model_dump(mode="json")))
    keys = {part for p in paths for part in p.split(".")}
    strings = {s for f in DENOISER.glob("*.py") for s, _ in _strings(f)}
    metrics = {s for s in strings if re.fullmatch(r"(train|eval|curriculum|perf)/[a-z_{}0-9]+", s)}
    platform_tags = {v for m in (protocol, tracking) for v in vars(m).values() if isinstance(v, str)}
    tags = {s for s in strings if re.fullmatch(r"paceray\.[a-z_]+", s)} - platform_tags
    assert {"curriculum.order", "train.steps", "eval.every"} <= paths  # the check looks at real names
    assert {"eval/fid", "train/loss", "curriculum/stage"} <= metrics and "paceray.fid_features" in tags
    return {"paths": paths, "keys": keys, "metrics": metrics, "tags": tags}


def test_the_platform_names_no_denoiser_config_path_metric_or_tag():
    names = denoiser_names()
    found = []
    for f in sorted(PLATFORM.rglob("*.py")):
        for s, line in _strings(f):
            for kind in ("paths", "metrics", "tags"):
                if s in names[kind]:
                    found.append(f"{f.relative_to(REPO)}:{line}: {kind[:-1]} {s!r}")
        for key, line in _subscript_keys(f):
            if key in names["keys"]:
                found.append(f"{f.relative_to(REPO)}:{line}: reads config key {key!r}")
    assert not found, "the platform names the denoiser's:\n" + "\n".join(found)


def test_the_check_catches_a_platform_that_reads_the_denoiser(tmp_path):
    """The same scan on a module written the old way finds each kind of name."""
    bad = tmp_path / "bad.py"
    bad.write_text('def f(c):\n    return c["curriculum"]["order"], "eval/fid", "paceray.fid_features", "train.steps"\n')
    names = denoiser_names()
    assert {k for k, _ in _subscript_keys(bad)} & names["keys"] == {"curriculum", "order"}
    assert {s for s, _ in _strings(bad)} & (names["metrics"] | names["tags"] | names["paths"]) == {
        "eval/fid", "paceray.fid_features", "train.steps"}


def test_trainables_import_only_the_protocol_from_the_platform():
    found = []
    for f in sorted((REPO / "trainables").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name.split(".")[0] == "paceray" and name != "paceray.protocol":
                    found.append(f"{f.relative_to(REPO)}:{node.lineno}: {name}")
    assert not found, "\n".join(found)


def test_entry_points_and_dotted_paths_resolve():
    assert {"denoiser", "difficulty-probe"} <= set(registry.registered())
    denoiser = registry.resolve("denoiser")
    assert isinstance(denoiser, Trainable) and denoiser.metric == "eval/fid"
    assert registry.resolve("trainables.denoiser:TRAINABLE") is denoiser
    assert registry.resolve("trainables.denoiser.TRAINABLE") is denoiser
    for ref, needle in [("nosuch", "no trainable named 'nosuch'"), ("nosuch_module:X", "no module"),
                        ("trainables.denoiser:NOPE", "has no 'NOPE'"), ("trainables.denoiser:Config", "not a")]:
        with pytest.raises(PacerayError, match=needle):
            registry.resolve(ref, "spec.yaml")


def test_the_ray_internal_paceray_reads_is_still_there():
    """ray_internals.tune_stop_flag reads Tune's session `stop_event`: if Ray renames it, this fails
    (and the trial function would mistake a scheduler's stop for a crash)."""
    import inspect

    from ray.train._internal import session

    from paceray.cluster.ray_internals import tune_stop_flag

    source = inspect.getsource(session)
    assert callable(session.get_session) and "def get_session() -> Optional[_TrainSession]" in source
    assert "self.stop_event = threading.Event()" in source
    assert tune_stop_flag() is None  # outside a trial


def test_the_log_to_driver_handler_paceray_replaces_is_still_there():
    """divert_worker_logs swaps Ray's `ray_print_logs` handler: if Ray renames it or changes the
    dispatcher, worker lines would come back onto the search's terminal."""
    import inspect

    from ray._private import worker
    from ray._private.ray_logging import WorkerStandardStreamDispatcher

    from paceray.cluster.ray_internals import PRINT_LOGS_HANDLER

    assert f'"{PRINT_LOGS_HANDLER}",' in inspect.getsource(worker.connect)
    assert {"add_handler", "remove_handler", "emit"} <= set(vars(WorkerStandardStreamDispatcher))
    fields = inspect.getsource(worker.print_worker_logs)
    assert all(f'"{k}"' in fields for k in ("pid", "ip", "actor_name", "task_name", "lines"))
    assert callable(worker.filter_autoscaler_events)


def test_the_ray_internals_that_keep_the_local_instance_private_are_still_there():
    """confine_to_loopback turns off ray_constants.ENABLE_RAY_CLUSTER (Ray then keeps a node IP of
    127.0.0.1) and enable_token_auth calls Ray's own switch: if Ray moves either, the local
    instance would listen on the machine's address, or run without a token."""
    import inspect

    from ray._private import ray_constants, services
    from ray._private.authentication import authentication_token_setup

    from paceray.cluster.ray_internals import SINGLE_NODE_ENV

    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR == SINGLE_NODE_ENV
    assert "ray_constants.ENABLE_RAY_CLUSTER" in inspect.getsource(services.get_node_ip_address)
    assert "get_node_ip_address()" in inspect.getsource(services.resolve_ip_for_localhost)
    assert "Config.initialize" in inspect.getsource(authentication_token_setup._enable_token_auth)


def test_a_trainer_without_datasets_starts_no_dataset_manager():
    """ray_internals.torch_trainer_class drops Train's DatasetsCallback (which starts a DatasetManager
    actor per worker group, datasets or not) and keeps every other default callback."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    from paceray.cluster.ray_internals import torch_trainer_class

    kwargs = dict(train_loop_per_worker=lambda: None, scaling_config=ScalingConfig(num_workers=1),
                  run_config=RunConfig(name="no-datasets", storage_path="/tmp"))
    ours, theirs = torch_trainer_class()(**kwargs), TorchTrainer(**kwargs)
    default = theirs._create_default_callbacks()
    assert any(isinstance(c, DatasetsCallback) for c in default)  # else the override has nothing to drop
    kept = ours._create_default_callbacks()
    assert [type(c) for c in kept] == [type(c) for c in default if not isinstance(c, DatasetsCallback)]


def test_paceray_elastic_policy_counts_a_node_once_for_strict_spread_and_never_shrinks_a_running_group():
    """Ray's elastic policy counts a surviving node with 3 free CPUs as room for 2 strict-spread
    workers (that cannot be placed there); paceray's counts the nodes that can take one. Ray's
    shrinks a running group to what its coordinator now reserves; paceray's keeps it (it grows,
    and a failure restarts it at what fits). The trainer hands the policy to the controller
    through the keyword Ray's fit() passes."""
    import inspect
    from types import SimpleNamespace

    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, NoopDecision, ResizeDecision
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from paceray.cluster.ray_internals import elastic_policy

    spread = ScalingConfig(num_workers=(1, 2), placement_strategy="STRICT_SPREAD", resources_per_worker={"CPU": 1})
    one_node_left = {"head": {"CPU": 3.0}}
    assert ElasticScalingPolicy(spread)._count_possible_workers(one_node_left) == 2  # what the override fixes
    ours = elastic_policy()(scaling_config=spread)
    assert ours._count_possible_workers(one_node_left) == 1
    assert ours._count_possible_workers({"head": {"CPU": 3.0}, "node": {"CPU": 1.0}}) == 2
    assert ours._count_possible_workers({"head": {"CPU": 0.5}, "node": {"CPU": 1.0}}) == 1
    packed = ScalingConfig(num_workers=(1, 2), resources_per_worker={"CPU": 1}, elastic_resize_monitor_interval_s=0)
    assert elastic_policy()(scaling_config=packed)._count_possible_workers(one_node_left) == 2  # Ray's rule

    def decide(policy, running: int, reserved: dict):
        """The running-group decision on `reserved` (the coordinator's answer, given directly:
        no Ray cluster here), at a group of `running` workers."""
        policy._get_reserved_resources = lambda: reserved
        policy._maybe_send_resource_request = lambda: None
        return policy.make_decision_for_running_worker_group(SimpleNamespace(start_time=0.0, num_workers=running), None)

    shrink = {"head": {"CPU": 1.0}}
    assert isinstance(decide(ElasticScalingPolicy(packed), 2, shrink), ResizeDecision)  # Ray's would shrink it
    assert isinstance(decide(elastic_policy()(scaling_config=packed), 2, shrink), NoopDecision)
    grown = decide(elastic_policy()(scaling_config=packed), 1, {"head": {"CPU": 2.0}})
    assert isinstance(grown, ResizeDecision) and grown.num_workers == 2
    assert "scaling_policy=create_scaling_policy(" in inspect.getsource(DataParallelTrainer.fit)


def test_the_checkpoint_snapshot_names_paceray_reads_are_still_there():
    from ray.train.v2._internal import constants

    from paceray.cluster.ray_internals import CHECKPOINT_SNAPSHOT, unreadable_snapshot_error

    assert constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == CHECKPOINT_SNAPSHOT
    assert issubclass(unreadable_snapshot_error(), Exception)


def test_the_autoscaler_maximum_paceray_reads_is_still_where_ray_train_reads_it():
    """ray_internals.autoscaler_max_resources reads what Ray Train's worker group checks a
    placement against; if Ray moves it, a search on an autoscaling cluster would be sized by the
    resources present."""
    import inspect

    from ray._private.state import GlobalState
    from ray.train.v2._internal.execution.worker_group import worker_group

    assert callable(GlobalState.get_max_resources_from_cluster_config)
    assert "get_max_resources_from_cluster_config()" in inspect.getsource(worker_group)
