"""The search space a spec describes, as trials: grid points expanded once on the driver and made
canonical (settings a point's other settings make irrelevant take the base's value, so points
differing only there run once), crossed with the spec's `arms` (joint settings, each one arm),
`tune.seeds` as replicates of every arm, Optuna's conditional
(define-by-run) space, and the step before which no trial of the space may be judged.

The trainable says what is irrelevant (`Trainable.irrelevant`) and which path is its seed
(`Trainable.seed_path`); everything here is generic.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass
from typing import Callable, Optional

from paceray.base.dotted import get_path, set_path
from paceray.spec.specfile import LoadedSpec


def canonical(loaded: LoadedSpec, config: dict) -> dict:
    """`config` with the trainable's irrelevant settings at the base's values."""
    hook = loaded.trainable.irrelevant
    if hook is None:
        return config
    out = copy.deepcopy(config)
    for path in hook(config):
        set_path(out, path, copy.deepcopy(get_path(loaded.base, path)))
    return out


def with_point(base: dict, point: dict) -> dict:
    config = copy.deepcopy(base)
    for key, value in point.items():
        set_path(config, key, value)
    return config


def seeds(loaded: LoadedSpec) -> list:
    return list(loaded.spec.tune.seeds or [])


def arm_paths(loaded: LoadedSpec) -> list[str]:
    """Every path some arm of the spec's `arms` sets, in order of first mention."""
    return list(dict.fromkeys(k for arm in loaded.arms for k in arm))


def arm_points(loaded: LoadedSpec) -> list[dict]:
    """Each arm as a point over every arm path, a path the arm leaves alone at the base's value
    (so that each point presets every path Tune's grid varies); `[{}]` without arms."""
    paths = arm_paths(loaded)
    return [{p: arm[p] if p in arm else get_path(loaded.base, p) for p in paths} for arm in loaded.arms] or [{}]


def searched_paths(loaded: LoadedSpec) -> tuple[str, ...]:
    """The paths a search varies, the seed path aside: `search`'s, then the arms'."""
    return tuple(dict.fromkeys([*loaded.search, *arm_paths(loaded)]))


def grid_points(loaded: LoadedSpec) -> list[dict]:
    """Every distinct grid point (dotted path -> value) crossed with every arm (the arms of one
    grid point side by side), canonical, times every seed of `tune.seeds` (seed-major: all arms of
    the first seed come first, so a search cut short still pairs its arms). Non-grid distributions
    are not here: Tune samples them per trial."""
    keys = [k for k, d in loaded.search.items() if d.kind == "grid"]
    paths = keys + arm_paths(loaded)
    points, seen = [], set()
    for values in itertools.product(*(loaded.search[k].args for k in keys)):
        for arm in arm_points(loaded):
            config = canonical(loaded, with_point(loaded.base, {**arm, **dict(zip(keys, values))}))
            point = {k: get_path(config, k) for k in paths}
            key = json.dumps(point, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                points.append(point)
    if seeds(loaded):
        path = loaded.trainable.seed_path
        points = [{**p, path: s} for s in seeds(loaded) for p in points]
    return points


def trial_count(loaded: LoadedSpec) -> Optional[int]:
    """Trials a grid search runs (None for random and Optuna searches, which sample)."""
    if loaded.spec.tune.algorithm != "grid":
        return None
    return len(grid_points(loaded)) * loaded.spec.tune.num_samples


def trial_count_preview(loaded: LoadedSpec) -> int:
    """How many trials the search makes: distinct canonical grid points × seeds × num_samples
    (a random or Optuna search: num_samples × seeds, times the grid for random)."""
    count = trial_count(loaded)
    if count is not None:
        return count
    n = loaded.spec.tune.num_samples * max(1, len(loaded.spec.tune.seeds or []))
    if loaded.spec.tune.algorithm == "random":
        n *= len(arm_points(loaded))
        for d in loaded.search.values():
            if d.kind == "grid":
                n *= len(d.args)
    return n


def define_by_run(loaded: LoadedSpec) -> "DefineByRun":
    """Optuna's define-by-run space: each searched setting is suggested only when the settings
    suggested before it leave it relevant. Settings that decide others' relevance go first."""
    return DefineByRun(dict(loaded.search), loaded.base, _gates_first(loaded), loaded.trainable.irrelevant)


@dataclass(frozen=True)
class DefineByRun:
    """The define-by-run space as an object, not a closure: Tune saves its searcher (and so this)
    with pickle at every checkpoint of the search, and pickle refuses local functions."""

    search: dict
    base: dict
    order: list
    irrelevant: Optional[Callable[[dict], list]]  # the trainable's hook: a module-level function

    def __call__(self, trial) -> None:
        chosen: dict = {}
        for key in self.order:
            if self.irrelevant is not None and key in set(self.irrelevant(with_point(self.base, chosen))):
                continue
            d = self.search[key]
            name = key.replace(".", "/")  # Tune unflattens Optuna's names on "/"
            if d.kind in ("grid", "choice"):
                chosen[key] = trial.suggest_categorical(name, list(d.args))
            elif d.kind == "randint":
                chosen[key] = trial.suggest_int(name, d.args[0], d.args[1] - 1)
            else:
                chosen[key] = trial.suggest_float(name, *d.args, log=d.kind == "loguniform")
        return None


def _gates_first(loaded: LoadedSpec) -> list[str]:
    """Searched paths ordered so that a path whose value can make another irrelevant comes first."""
    keys = list(loaded.search)
    hook = loaded.trainable.irrelevant
    if hook is None:
        return keys
    gates = {k: set() for k in keys}  # k -> the keys that k can switch off
    for k in keys:
        for value in loaded.search[k].probe_values():
            for other in hook(with_point(loaded.base, {k: value})):
                if other in gates and other != k:
                    gates[k].add(other)
    ordered: list[str] = []
    while len(ordered) < len(keys):
        ready = [k for k in keys if k not in ordered and not any(k in gates[g] for g in keys if g not in ordered
                                                                 and g != k)]
        ordered.append(ready[0] if ready else next(k for k in keys if k not in ordered))
    return ordered


def probe_configs(loaded: LoadedSpec) -> list[dict]:
    """Configs of every arm at every listed value and both ends of every range of the space (all
    combinations up to 4,096, else each value alone), canonical."""
    probes = [[(k, v) for v in d.probe_values()] for k, d in loaded.search.items()]
    size = 1
    for p in probes:
        size *= max(1, len(p))
    configs = []
    for arm in arm_points(loaded):
        combos = itertools.product(*probes) if size <= 4096 else ([p] for ps in probes for p in ps)
        configs += [canonical(loaded, with_point(loaded.base, {**arm, **dict(combo)})) for combo in combos]
    return configs or [loaded.base]


def judged_from(loaded: LoadedSpec) -> Optional[int]:
    """The largest step before which some trial of the space cannot be judged fairly."""
    hook = loaded.trainable.judged_from
    if hook is None:
        return None
    steps = [hook(c) for c in probe_configs(loaded)]
    return max((s for s in steps if s is not None), default=None)
