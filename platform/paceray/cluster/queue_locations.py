"""Where each trial's tracking queue lies, so that a search's driver can find the ones nobody
delivered: a queue sits on the disk of the node its rank 0 ran on, and a node that dies takes its
trial's deliverer with it (the trial itself may go on elsewhere, with a queue of its own there).

One Ray actor per search, named in the search's Ray namespace and owned by its driver (it ends
with it). A rank 0 opening its run's queue says so (`announce`: run, node, path), and says it
again once the queue is empty (`announce_delivered`). What the actor holds at the search's end, less what was
delivered, is what the driver looks at (paceray.search.leftover_queues). Outside a search (no
actor: `paceray train`), opening a queue tells nobody.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

ACTOR_NAME = "paceray-tracking-queues"
SAY_TIMEOUT_S = 30.0


class _Locations:
    def __init__(self):
        self.opened: dict[tuple[str, str], dict] = {}  # (run id, node id) -> where

    def open(self, where: dict) -> None:
        self.opened[(where["run_id"], where["node_id"])] = where

    def deliver(self, run_id: str, node_id: str) -> None:
        self.opened.pop((run_id, node_id), None)

    def undelivered(self) -> list[dict]:
        return list(self.opened.values())


def marker(folder: Path, node_id: str) -> Path:
    """A file beside a queue saying which node opened it: a driver that sees it shares that
    node's disk (or is on it), and can deliver the queue itself."""
    return folder.with_name(f"{folder.name}.node-{node_id}")


def start():
    """The search's actor, on the head (the driver's own: it ends with the driver)."""
    import ray

    from paceray.cluster.connect import HEAD_RESOURCE

    return ray.remote(num_cpus=0, resources={HEAD_RESOURCE: 0.001})(_Locations).options(name=ACTOR_NAME).remote()


def _actor():
    import ray

    if not ray.is_initialized():
        return None
    try:
        return ray.get_actor(ACTOR_NAME)
    except ValueError:  # no search around this process
        return None


def announce(run_id: str, path: str) -> Optional[dict[str, str]]:
    """A queue opened at `path` on this process's node: told to the search's actor; this node
    (its Ray id and address), or None if no search listens."""
    actor = _actor()
    if actor is None:
        return None
    import ray

    node = {"node_id": this_node(), "ip": ray.util.get_node_ip_address()}
    # Waited for: "said" means the actor holds it, before any later word of this process.
    ray.get(actor.open.remote({"run_id": run_id, "path": path, **node}), timeout=SAY_TIMEOUT_S)
    return node


def announce_delivered(run_id: str, node: dict[str, str]) -> None:
    actor = _actor()
    if actor is not None:
        import ray

        ray.get(actor.deliver.remote(run_id, node["node_id"]), timeout=SAY_TIMEOUT_S)


def undelivered(actor, timeout: float = 30.0) -> list[dict]:
    """The queues opened and not said delivered: [{run_id, node_id, ip, path}]."""
    import ray

    return ray.get(actor.undelivered.remote(), timeout=timeout)


def this_node() -> str:
    """The Ray id of this process's node."""
    import ray

    return ray.get_runtime_context().get_node_id()


def nodes() -> dict[str, bool]:
    """Every node Ray has known in this cluster: id -> alive."""
    import ray

    return {n["NodeID"]: bool(n.get("Alive")) for n in ray.nodes()}


def run_on_node(node_id: str, fn: Callable[..., Any], *args, timeout: float = 120.0) -> Optional[Any]:
    """`fn(*args)` in a task on that node (it must be alive); None if it could not run there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(fn).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    try:
        return ray.get(task.remote(*args), timeout=timeout)
    except Exception:  # the node died meanwhile, or the task could not start there in time
        return None
