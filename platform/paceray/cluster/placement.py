"""Where a trial's ranks ran: gathered on every rank as its worker group starts, said in the
worker log, and put on the trial's run as tags; and the one line for a group Ray never placed."""

from __future__ import annotations

from typing import Optional

from paceray.protocol.keys import NODES_TAG, PLACEMENT_KEY, PLACEMENT_TAG
from paceray.spec.specfile import ResourcesSection


def gather_placement() -> list[dict]:
    """On every rank, as its worker group starts: every rank's node (id and address), gathered
    to each rank; rank 0 says it in the worker log."""
    import ray
    import ray.train
    import torch.distributed as dist

    me = {"rank": ray.train.get_context().get_world_rank(), "node_id": ray.get_runtime_context().get_node_id(),
          "ip": ray.util.get_node_ip_address()}
    ranks = [me]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, me)
    if me["rank"] == 0:  # nodes by Ray's node id, as the run's tags count them: raylets may share an address
        nodes = {r["node_id"] for r in ranks}
        print(f"paceray: {len(ranks)} rank(s) on {len(nodes)} node(s): "
              + ", ".join(f"rank {r['rank']} on {r['ip']} (node {r['node_id'][:8]})" for r in ranks), flush=True)
    return ranks


def placement_failure(error: BaseException, resources: ResourcesSection) -> Optional[str]:
    """One line for a trial Ray Train gave up placing (its worker group never started within
    resources.worker_wait_s), or None for any other failure. Ray's own message starts with the
    heading "Training failed due to controller error:" and runs to a paragraph."""
    if "worker group startup timed out" not in str(error):
        return None
    need = f"{resources.fewest_workers} worker(s) × {resources.cpus_per_worker:g} CPU" + (
        f" + {resources.gpus_per_worker:g} GPU" if resources.gpus_per_worker else "")
    return (f"its worker group ({need}) could not be placed within resources.worker_wait_s "
            f"({resources.worker_wait_s:g} s): the cluster lacks the resources (a node lost, or not yet added)")


def placement_tags(result) -> dict[str, str]:
    """The run's tags for where the trial's last worker group ran (from rank 0's return value)."""
    import json

    ranks = (getattr(result, "return_value", None) or {}).get(PLACEMENT_KEY) if result is not None else None
    if not ranks:
        return {}
    return {PLACEMENT_TAG: json.dumps(ranks)[:5000], NODES_TAG: str(len({r["node_id"] for r in ranks}))}
