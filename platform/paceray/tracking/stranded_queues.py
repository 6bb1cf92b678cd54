"""Trial queues a search's end found undelivered (paceray.search.leftover_queues): how one is
said, and how the list rides on the search's parent run (a tag) for `paceray report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from paceray.tracking.runlog import replay_command

TAG = "paceray.undelivered_queues"


def describe(q: dict, uri: Optional[str]) -> str:
    """One line for a queue left undelivered."""
    if q.get("error"):
        return q["error"]
    node = f"node {q['ip']} ({q['node_id'][:8]}, {'alive' if q['node_alive'] else 'lost'})"
    what = f"{q['waiting']} write(s) waiting" if q["waiting"] is not None else "what it holds is unknown"
    return (f"run {q['run_id']} (trial {q['trial_id']}): its queue on {node} at {q['path']}: {what}; "
            f"on that disk: `{replay_command(Path(q['path']), uri)}`")


def tag_value(left: list[dict]) -> str:
    """The parent run's tag: as many whole entries as MLflow's 5000 characters hold."""
    kept = list(left)
    while kept and len(json.dumps(kept)) > 5000:
        kept.pop()
    return json.dumps(kept)


def from_tag(value: Optional[str]) -> list[dict]:
    try:
        found = json.loads(value) if value else []
    except ValueError:
        return []
    return [q for q in found if isinstance(q, dict)] if isinstance(found, list) else []
