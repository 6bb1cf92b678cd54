"""The one place paceray reads a Ray internal, because no public API says it (Ray 2.60).

- Inside a Tune function trainable, whether Tune itself is stopping this trial (a scheduler's
  decision): Tune then kills the trial's process, and its TorchTrainer's death is not a trial
  failure. Tune's session keeps that as a `threading.Event` called `stop_event`.
- Which of Ray Train's default controller callbacks a trainer without Ray Datasets can drop:
  `DatasetsCallback` starts a `DatasetManager` actor at every worker-group start even when the
  trainer has no datasets (paceray's trainables read their own shards), one more Python process
  per trial that imports Ray Data and pandas (~2 s of CPU each time, measured on this machine).
  The trainer's `_create_default_callbacks` is the only hook.
- Where the driver prints its workers' output (`log_to_driver`): a handler named
  `ray_print_logs` on Ray's worker-stream dispatcher, fed dicts with `lines`, `pid`, `ip` and the
  actor or task name. A search's live view replaces it with one writing those lines to a file,
  prefixed as Ray prints them (`divert_worker_logs`).
- How to keep a local instance on loopback: Ray resolves a node IP of 127.0.0.1 to the machine's
  address (`services.resolve_ip_for_localhost`) unless `ray_constants.ENABLE_RAY_CLUSTER` is
  off (the `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` of single-node macOS and Windows), read when
  `ray` is imported; with it off, every process binds loopback (`confine_to_loopback`).
- How to turn token authentication on in a process whose `ray` is imported already: Ray's own
  `authentication_token_setup._enable_token_auth` (sets RAY_AUTH_MODE and re-reads Ray's config,
  which caches the mode at import), as its local `ray.init()` does by default.
- How to choose the network interface of a trial's process group on each node before Ray
  Train initialises it: Ray's `_TorchBackend.on_start` does the init, so a `TorchConfig` whose
  backend sets GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME on every worker first
  (`node_aware_torch_config`). Without it, gloo on a node whose hostname resolves to loopback
  advertises 127.0.0.1 to ranks on other nodes ("Gloo connectFullMesh failed").
- What an autoscaling cluster can grow to: the autoscaler reports its node types' maximum
  counts to the GCS, and Ray Train reads them back through `ray._private.state`'s
  `get_max_resources_from_cluster_config` (its worker group's feasibility check); paceray reads
  the same (`autoscaler_max_resources`) to size a search's concurrency.
- How Ray Train sizes an elastic worker group: `ElasticScalingPolicy._count_possible_workers`
  over the resources its autoscaling coordinator reserved per node, blind to strict-spread; the
  trainer's `_initialize_and_run_controller` takes the policy as a keyword, the only hook to give
  a strict-spread trial one that counts a node once, and a running group one that never
  shrinks (`elastic_policy`).
- How Ray Train says its checkpoint snapshot (the list of checkpoints it registered, which it
  rewrites in place) cannot be read: `CheckpointManagerInitializationError`, and the file's name.

tests/test_protocol.py fails loudly when Ray moves any of them.
"""

from __future__ import annotations

import functools
import threading
from typing import Optional

CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


def tune_stop_flag() -> Optional[threading.Event]:
    """The event Tune sets when it stops this trial; None outside a Tune trial."""
    from ray.train._internal.session import get_session

    session = get_session()
    return None if session is None else session.stop_event


def unreadable_snapshot_error() -> type:
    """The error `ray.train.Result.from_path` raises for a checkpoint snapshot it cannot parse."""
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    return CheckpointManagerInitializationError


@functools.cache
def torch_trainer_class():
    """TorchTrainer, less the idle DatasetManager actor when it is given no datasets, and with
    paceray's elastic scaling policy for an elastic trial (`elastic_policy`)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

        def _initialize_and_run_controller(self, **kwargs):
            if self.scaling_config.elasticity_enabled:
                kwargs["scaling_policy"] = elastic_policy()(scaling_config=self.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)

    return Trainer


@functools.cache
def elastic_policy():
    """Ray Train's elastic scaling policy, with two changes for trials that share a cluster:
    - a strict-spread group counts at most one worker per node. Ray's own counts each node's free
      resources over a worker's (`_count_possible_workers`), blind to the placement strategy: a
      strict-spread trial that lost a node, on a surviving node with 3 free CPUs, is told 2
      workers fit, asks for 2 strict-spread bundles that cannot be placed there, times out, and
      asks again for ever (measured: tests/test_multinode.py, before this);
    - a running group never shrinks. Ray's resizes it to whatever its autoscaling coordinator
      reserves for it now, and that moves as other trials ask: three elastic trials of one
      search restarted each other from checkpoints, 2 -> 1 -> 2 ranks, without any failure. A
      group loses ranks only when a worker or node fails, and then restarts at what fits."""
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, NoopDecision, ResizeDecision

    class PacerayElasticPolicy(ElasticScalingPolicy):
        def _count_possible_workers(self, reserved_resources) -> int:
            if self.scaling_config.placement_strategy != "STRICT_SPREAD":
                return super()._count_possible_workers(reserved_resources)
            need = {k: v for k, v in self.scaling_config._resources_per_worker_not_none.items() if v > 0}
            fits = sum(1 for free in reserved_resources.values()
                       if all(free.get(k, 0.0) >= v for k, v in need.items()))
            return min(fits, self.scaling_config.max_workers)

        def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
            decision = super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)
            if isinstance(decision, ResizeDecision) and decision.num_workers < worker_group_state.num_workers:
                return NoopDecision()
            return decision

    return PacerayElasticPolicy


def autoscaler_max_resources() -> Optional[dict[str, float]]:
    """The most of each resource the cluster's autoscaler can add (its node types' resources ×
    their maximum counts; the head's own are not in it); None where no autoscaler reported one."""
    from ray._private.state import state

    found = state.get_max_resources_from_cluster_config()
    return {k: float(v) for k, v in found.items()} if found else None


SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def node_aware_torch_config(backend: str, socket_ifname: Optional[str]):
    """Ray Train's TorchConfig for `backend`, whose process group, on every worker, uses
    `socket_ifname` when given, else the interface a user set in GLOO_SOCKET_IFNAME /
    NCCL_SOCKET_IFNAME there, else the interface that holds the worker's node address (the
    address the other ranks reach that node on)."""
    from dataclasses import dataclass

    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class Backend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            worker_group.execute(choose_socket_ifname, backend_config.socket_ifname)
            super().on_start(worker_group, backend_config)

    @dataclass
    class NodeAwareTorchConfig(TorchConfig):
        socket_ifname: Optional[str] = None

        @property
        def backend_cls(self):
            return Backend

    return NodeAwareTorchConfig(backend=backend, socket_ifname=socket_ifname)


def choose_socket_ifname(configured: Optional[str]) -> Optional[str]:
    """On a training worker: set the process group's interface variables (see
    node_aware_torch_config); the interface chosen, or None when the node address is on no
    local interface (then gloo and NCCL choose, as without paceray)."""
    import os

    import psutil
    import ray

    if configured:
        chosen = configured
    else:
        address = ray.util.get_node_ip_address()
        chosen = next((name for name, addrs in psutil.net_if_addrs().items()
                       if any(a.address == address for a in addrs)), None)
    for var in SOCKET_IFNAME_VARS:
        if configured or not os.environ.get(var):
            if chosen:
                os.environ[var] = chosen
    return chosen


PRINT_LOGS_HANDLER = "ray_print_logs"  # ray._private.worker.connect's name for the log_to_driver handler


def divert_worker_logs(sink) -> None:
    """Send the workers' output that `log_to_driver` prints on this driver's terminal to `sink`
    (an open text file) instead, each line prefixed as Ray prints it (`(RayTrainWorker pid=7,
    ip=10.0.0.2)`), without Ray's colour codes."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    if not any(name == PRINT_LOGS_HANDLER for name, _ in dispatcher.handlers):
        raise RuntimeError(f"Ray's {PRINT_LOGS_HANDLER!r} handler is gone: ray_internals needs updating")
    dispatcher.remove_handler(PRINT_LOGS_HANDLER)

    from ray._private.worker import filter_autoscaler_events

    def write(data) -> None:
        name = data.get("actor_name") or data.get("task_name")
        pid = data.get("pid")
        ip = data.get("ip")
        prefix = f"({name + ' ' if name else ''}pid={pid}{'' if ip == data.get('localhost') else f', ip={ip}'})"
        lines = data.get("lines", [])
        if pid == "autoscaler":  # its status dumps, cut to the events, as Ray's own printer does
            lines = list(filter_autoscaler_events(lines))
        sink.writelines(f"{prefix} {line}\n" for line in lines)
        sink.flush()

    dispatcher.add_handler("paceray_worker_log", write)


SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR


def confine_to_loopback() -> None:
    """Make the local Ray instance this process is about to start single-node: its node IP is
    127.0.0.1, so the GCS, raylet, workers, dashboard, agents and metrics endpoints bind loopback.
    The environment variable reaches the processes Ray starts; the constant, this process, whose
    `ray` may be imported already."""
    import os

    from ray._private import ray_constants

    os.environ[SINGLE_NODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def enable_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process (its cached Ray config re-read) and its children."""
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()
