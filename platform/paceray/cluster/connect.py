"""Connecting to Ray: the cluster named by --address / RAY_ADDRESS, else a local instance started
explicitly for this command (a bare `ray.init()` may attach to a dead cluster left in
/tmp/ray/ray_current_cluster)."""

from __future__ import annotations

import os
from typing import Optional

from paceray.base.errors import PacerayError, one_line


def connect(address: Optional[str] = None, num_cpus: Optional[int] = None) -> str:
    """Initialise Ray once for this process; returns a description for the user."""
    import ray

    if ray.is_initialized():
        return "ray (already connected)"
    address = address or os.environ.get("RAY_ADDRESS")
    for key, value in RAY_DEFAULTS.items():  # a user's own setting wins
        os.environ.setdefault(key, value)
    if address and address != "local":
        check_address(address)
        from paceray.base.paths import inside_ray_job

        # Workers on a running cluster inherit the environment of the node that started them, not
        # this command's: the job carries the command's PACERAY_* and MLFLOW_* settings to them
        # (under `ray job submit`, the job's own runtime env does: --runtime-env-json).
        runtime_env = None if inside_ray_job() else {"env_vars": forwarded_env()}
        try:
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise PacerayError(one_line(f"--address {address}: cannot connect to a Ray cluster ({e})")) from None
        return f"Ray cluster at {address}"
    # One machine is never drained or preempted: Train's preemption watcher (an actor, so one more
    # Python process per trial) has nothing to watch on the local instance. Clusters keep it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    _protect_local_instance()
    # The dashboard serves the State API that Train's placement-group cleaner polls; without it
    # every trial logs "Failed to query Ray Train Controller actor state" every few seconds.
    import importlib.util

    # (A minimal Ray, without the `default` extra's aiohttp_cors, cannot start it: go without.)
    dashboard = importlib.util.find_spec("aiohttp_cors") is not None
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
             log_to_driver=True, configure_logging=True, logging_level="warning")
    return "a local Ray instance"


# Train V2 (the default, kept explicit). The Train controller polls its workers every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s), so a trial that has ended is noticed up to
# that late, and a report waits for the next poll: 0.5 s cuts ~1 s off every trial (measured on the
# tests' tiny trials: the last report to the run's end 2.6 s -> 1.4-1.8 s) for one more cheap RPC a
# second. Ray propagates both from the process that calls fit() to the controller and its workers.
RAY_DEFAULTS = {"RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
FORWARDED_PREFIXES = ("PACERAY_", "MLFLOW_")


def check_address(address: Optional[str] = None) -> None:
    """One line, in seconds, for an --address / RAY_ADDRESS that names no Ray cluster (before a
    command writes anything or takes its lock)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address == "local":
        return
    if address.startswith("http"):  # a dashboard address is for `ray job submit`, not for ray.init
        raise PacerayError(f"--address {address}: give the GCS address (host:6379) or 'auto'; "
                           f"{address} is the Jobs API address used by `ray job submit`")
    _check_gcs_port(address)


def forwarded_env() -> dict[str, str]:
    """The settings of this command that its trials' processes on a cluster must see too (Tune
    trials call fit() on the cluster's workers: they need the Ray Train settings as well)."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES) or k in RAY_DEFAULTS}


def _check_gcs_port(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after Ray's minute of reconnect attempts, when nothing listens there."""
    import socket

    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise PacerayError(f"--address {address}: expected host:port of the Ray head's GCS (e.g. 10.0.0.5:6379) or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise PacerayError(f"--address {address}: cannot connect to a Ray cluster ({e.strerror or e}); "
                           f"is `ray start --head` running there?") from None


_made_token: Optional[str] = None  # the token file this command made for its local instance


def _protect_local_instance() -> None:
    """The local instance is usable from this machine only: every port on loopback
    (ray_internals.confine_to_loopback), and Ray's token authentication on explicitly, so that
    another user of this machine cannot reach it either. The token is the user's
    (RAY_AUTH_TOKEN, or the file RAY_AUTH_TOKEN_PATH names, which must be theirs alone), else one
    made for this command in a file only its user reads, removed at shutdown. RAY_AUTH_MODE=disabled,
    set by the user, is honoured, with a warning."""
    import secrets
    import stat
    import sys
    import tempfile

    from paceray.cluster.ray_internals import confine_to_loopback, enable_token_auth

    global _made_token
    confine_to_loopback()
    mode = os.environ.get("RAY_AUTH_MODE", "token")
    if mode != "token":
        print(f"warning: RAY_AUTH_MODE={mode}: the local Ray instance takes any client on this machine "
              f"(its ports are on loopback only)", file=sys.stderr, flush=True)
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if os.environ.get("RAY_AUTH_TOKEN"):
        pass
    elif path:
        try:
            mode_bits = os.stat(path).st_mode
        except OSError as e:
            raise PacerayError(one_line(f"RAY_AUTH_TOKEN_PATH {path}: unreadable ({e})")) from None
        if mode_bits & (stat.S_IRWXG | stat.S_IRWXO):
            raise PacerayError(f"RAY_AUTH_TOKEN_PATH {path}: other users can read it (mode {oct(mode_bits & 0o777)}): "
                               f"chmod 600 {path}")
    else:
        folder = tempfile.mkdtemp(prefix="paceray-ray-token-")  # 0700
        _made_token = os.path.join(folder, "auth_token")
        fd = os.open(_made_token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN_PATH"] = _made_token
    enable_token_auth()


def shutdown() -> None:
    import ray

    global _made_token
    if ray.is_initialized():
        ray.shutdown()
    if _made_token is not None:
        import shutil

        shutil.rmtree(os.path.dirname(_made_token), ignore_errors=True)
        _made_token = None


def cluster_resources() -> dict:
    import ray

    return dict(ray.cluster_resources())


PRESENT = "the resources present now"
HEAD_RESOURCE = "node:__internal_head__"  # Ray's resource of the head node alone


def cluster_capacity(max_cluster: Optional[dict[str, float]]) -> tuple[dict[str, float], str]:
    """What a search can count on running its trials with, and where that figure comes from: on
    an autoscaling cluster, what it can grow to (the head's resources plus the autoscaler's
    maximum, which Ray reports; else the spec's `resources.max_cluster`), never less than what is
    present; otherwise what is present. A KubeRay cluster whose GPU workers start from zero has 0
    GPUs when the search starts."""
    import ray

    from paceray.cluster import ray_internals

    present = cluster_resources()
    added = ray_internals.autoscaler_max_resources()
    if added:
        head = next((n["Resources"] for n in ray.nodes() if n.get("Alive") and HEAD_RESOURCE in n.get("Resources", {})), {})
        grown, source = {k: head.get(k, 0.0) + added.get(k, 0.0) for k in {*head, *added}}, "the autoscaler's maximum"
    elif max_cluster:
        grown, source = dict(max_cluster), "resources.max_cluster"
    else:
        return present, PRESENT
    return {k: max(present.get(k, 0.0), grown.get(k, 0.0)) for k in {*present, *grown}}, source


def describe_resources(resources: dict[str, float]) -> str:
    """`CPU=4, GPU=2`: the amounts a trial's fit is judged by."""
    return ", ".join(f"{k}={resources[k]:g}" for k in ("CPU", "GPU") if k in resources)


def _on_this_machine(address: str) -> bool:
    """Is `address` loopback or one of this machine's own interface addresses?"""
    import psutil

    return address.startswith("127.") or any(a.address == address for addrs in psutil.net_if_addrs().values()
                                             for a in addrs)


def check_tracking_reach(tracking_uri: Optional[str]) -> None:
    """One line when the cluster's other nodes could not reach the tracking store: the embedded
    store (`tracking_uri` None) and a loopback URI serve this machine only, but a trial's rank 0
    may run on any node (unless every node is this machine's own)."""
    from urllib.parse import urlparse

    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    nodes = len(alive)
    if nodes < 2 or all(_on_this_machine(n.get("NodeManagerAddress", "")) for n in alive):
        return  # several raylets of this machine (a test's or a laptop's): they reach its loopback
    if tracking_uri is None:
        what = "the embedded MLflow store serves this machine only"
    elif urlparse(tracking_uri).hostname in ("127.0.0.1", "localhost", "::1"):
        what = f"--tracking-uri {tracking_uri} is this machine's loopback"
    else:
        return
    raise PacerayError(f"the Ray cluster has {nodes} nodes and {what}, which a trial on another node cannot reach: "
                       f"pass --tracking-uri http://HOST:PORT of an MLflow server every node reaches "
                       f"(k8s/ deploys one; README: Past one machine)")

