"""At a search's end, the trial queues nobody delivered (paceray.cluster.queue_locations): each
rank 0 says where it opened its run's queue and says again once it emptied it, so what is left
was opened by a process that died with writes maybe still queued, most often on a lost node.

Each is delivered where it can be, first: by the driver where it sees that node's disk (its own
node, or a shared run directory: the marker the opener left beside the queue says so), else by a
task on that node while the node lives. What is still left is named, run, trial, node and path,
in the search's end summary, in `searches/NAME/undelivered-queues.json` and on the search's
parent run (paceray.tracking.stranded_queues: a tag `paceray report` reads).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from paceray.base.atomic import write_text_atomic
from paceray.cluster import queue_locations
from paceray.search.endings import recorded_runners
from paceray.tracking import spool

FILE = "undelivered-queues.json"


def _deliver(folder: str, uri: str, env: dict[str, str]) -> int:
    """Drain the queue at `folder` into `uri` (where it lies: on the driver, or in a task on its
    node); how many writes are still waiting after."""
    for key, value in env.items():  # a user's own setting wins, as in every process of a search
        os.environ.setdefault(key, value)
    path = Path(folder)
    if not path.is_dir():
        return 0
    spool.drain(path, spool.mlflow_deliverer(uri))
    return len(spool.waiting(path)) if path.is_dir() else 0


def settle(actor, uri: str, env: dict[str, str], records: Path) -> list[dict]:
    """Deliver every undelivered trial queue that can be reached; the rest, named: [{run_id,
    trial_id, node_id, ip, path, node_alive, waiting (None: unknown, on a lost node's disk)}]."""
    try:
        opened = queue_locations.undelivered(actor)
        alive, here = queue_locations.nodes(), queue_locations.this_node()
    except Exception as e:  # Ray went down under the driver: nothing to say but that
        return [{"run_id": "?", "trial_id": "?", "node_id": "?", "ip": "?", "path": "?", "node_alive": None,
                 "waiting": None, "error": f"where the trials' queues lie was lost with Ray ({type(e).__name__})"}]
    trials = {run.run_id: runner.trial_id for runner in recorded_runners(records) for run in runner.runs.values()}
    left = []
    for q in opened:
        folder = Path(q["path"])
        mark = queue_locations.marker(folder, q["node_id"])
        waiting: Optional[int]
        if q["node_id"] == here or mark.exists():  # its disk is this one
            waiting = _deliver(q["path"], uri, env)
        elif alive.get(q["node_id"]):
            waiting = queue_locations.run_on_node(q["node_id"], _deliver, q["path"], uri, env)
        else:
            waiting = None
        if waiting == 0:
            mark.unlink(missing_ok=True)
            continue
        left.append({**q, "trial_id": trials.get(q["run_id"], "?"), "node_alive": alive.get(q["node_id"], False),
                     "waiting": waiting})
    return left


def save(left: list[dict], search_dir: Path) -> Path:
    path = search_dir / FILE
    write_text_atomic(path, json.dumps(left, indent=2))
    return path
