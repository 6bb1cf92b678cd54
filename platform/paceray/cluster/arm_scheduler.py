"""ASHA over the arms of a packed search: Tune's schedulers stop whole trials, and a packed trial
holds several arms, so a packed search runs FIFO in Tune and this scheduler judges arms.

One Ray actor per search, started by the search's driver; a pack's rank 0 asks it at each eval
(`judge`), with every live arm's metric at that step. Rungs lie at grace·rfᵏ steps (below the last
step); an arm reaching a rung is recorded there, and stopped when its value is worse than the
1/rf quantile of the values recorded at that rung (Tune's ASHAScheduler's rule). All arms of the
pack reaching a rung are recorded before any of them is judged. A decision is given once per arm
and rung: a pack restarted from an earlier checkpoint that asks again gets the same answer. The
state is saved (atomically) in the run directory after every decision, so `paceray tune --resume`
continues with it.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from paceray.base.atomic import write_text_atomic


@dataclass
class ArmAsha:
    grace: int
    reduction_factor: int
    max_t: int
    mode: str = "min"
    # rung milestone (as str, for JSON) -> arm id -> the value recorded there
    recorded: dict[str, dict[str, float]] = field(default_factory=dict)
    # arm id -> rung milestone -> stopped there?
    decided: dict[str, dict[str, bool]] = field(default_factory=dict)

    @property
    def rungs(self) -> list[int]:
        """Milestones, highest first (as Tune's ASHA checks them)."""
        out, k = [], 0
        while (milestone := self.grace * self.reduction_factor ** k) < self.max_t:
            out.append(milestone)
            k += 1
        return out[::-1]

    def judge(self, step: int, values: Mapping[str, float]) -> dict[str, bool]:
        """Arm id -> whether to stop it, for arms of one pack reporting `values` at `step`. An arm
        is judged at the highest rung it has reached and not yet been judged at."""
        rung = next((m for m in self.rungs if step >= m), None)
        if rung is None:
            return {arm: False for arm in values}
        at = self.recorded.setdefault(str(rung), {})
        fresh = [arm for arm in values if str(rung) not in self.decided.get(arm, {})]
        for arm in fresh:  # every arm of the pack recorded before any is judged
            at[arm] = float(values[arm])
        cutoff = self._cutoff(list(at.values()))
        for arm in fresh:
            value = at[arm]
            worse = not math.isfinite(value) or (cutoff is not None and
                                                 (value > cutoff if self.mode == "min" else value < cutoff))
            self.decided.setdefault(arm, {})[str(rung)] = worse
        return {arm: self.decided.get(arm, {}).get(str(rung), False) for arm in values}

    def _cutoff(self, values: list[float]) -> Optional[float]:
        finite = [v for v in values if math.isfinite(v)]
        if len(finite) < 2:
            return None
        # The 1/rf quantile from the better end (linear interpolation, as numpy's percentile).
        cuts = statistics.quantiles(finite, n=self.reduction_factor, method="inclusive")
        return cuts[0] if self.mode == "min" else cuts[-1]

    def to_json(self) -> str:
        return json.dumps({"grace": self.grace, "reduction_factor": self.reduction_factor, "max_t": self.max_t,
                           "mode": self.mode, "recorded": self.recorded, "decided": self.decided}, sort_keys=True)

    @classmethod
    def load(cls, path: Path, **settings) -> "ArmAsha":
        """The saved state at `path` (a resumed search's), else a fresh one with `settings`."""
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls(**settings)
        return cls(**{**settings, "recorded": saved.get("recorded", {}), "decided": saved.get("decided", {})})


class _SchedulerActor:
    def __init__(self, path: str, settings: dict):
        self.path = Path(path)
        self.asha = ArmAsha.load(self.path, **settings)

    def judge(self, step: int, values: dict) -> dict:
        decisions = self.asha.judge(step, values)
        write_text_atomic(self.path, self.asha.to_json())
        return decisions


def start(path: Path, grace: int, reduction_factor: int, max_t: int, mode: str):
    """The search's arm scheduler, a Ray actor on the head (owned by the driver: it ends with it;
    a resumed search starts a new one from the state saved at `path`)."""
    import ray

    from paceray.cluster.connect import HEAD_RESOURCE

    actor = ray.remote(num_cpus=0, resources={HEAD_RESOURCE: 0.001})(_SchedulerActor)
    path.parent.mkdir(parents=True, exist_ok=True)
    return actor.remote(str(path), {"grace": grace, "reduction_factor": reduction_factor, "max_t": max_t,
                                    "mode": mode})


@dataclass(frozen=True)
class ArmJudge:
    """What a pack's rank 0 calls at an eval: `judge(step, {arm id: value}) -> {arm id: stop?}`
    (TrialContext.judge_arms). Pickled to the workers with the actor's handle."""

    actor: object
    by: str = "asha"

    def __call__(self, step: int, values: Mapping[str, float]) -> dict[str, bool]:
        import ray

        return ray.get(self.actor.judge.remote(step, dict(values)))
