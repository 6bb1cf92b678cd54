"""A packed Optuna search: one Tune trial asks Optuna for up to K points and trains them as a pack.

Optuna suggests one configuration per call, and a Tune trial is one call; this `Searcher` wraps
Ray's `OptunaSearch` and asks it for K points per Tune trial (each point an Optuna trial of its
own, told its arm's result). Points the trainable does not let share
a pack (`Packing.key`: e.g. a searched learning rate) wait for a later trial of their own kind.
When the pack ends, each arm's last value of the metric (its own, `a<k>/metric` in the pack's
reports: an arm the arm scheduler stopped, its value there) is told to Optuna for that arm; an arm
the reports flag as failed, or without a finite value, or of a pack that failed, is told as failed. The spec's
`num_samples` counts arms, as it does unpacked.
"""

from __future__ import annotations

import copy
import math
import pickle
from typing import Callable, Optional

from ray.tune.search import Searcher

from paceray.base.dotted import flatten, set_path
from paceray.protocol import packing


class PackedSearcher(Searcher):
    def __init__(self, inner: Searcher, base: dict, pack: int, arms: int,
                 canonical: Callable[[dict], dict], key: Callable[[dict], str]):
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner, self.base, self.pack, self.arms_total = inner, base, pack, arms
        self.canonical, self.key = canonical, key
        self.asked = 0  # Optuna trials asked for so far (arms)
        self.waiting: list[tuple[str, dict]] = []  # (Optuna trial id, config) not yet in a pack
        self.packs: dict[str, list[str]] = {}  # Tune trial id -> its arms' Optuna trial ids
        self.latest: dict[str, dict[int, float]] = {}  # Tune trial id -> arm index -> last metric
        self.failed: dict[str, set[int]] = {}  # Tune trial id -> arms its reports flagged as failed

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], config: dict, **spec) -> bool:
        ok = self.inner.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.inner.metric, self.inner.mode
        return ok

    def suggest(self, trial_id: str):
        while self.asked < self.arms_total and len(self.waiting) < self.pack:
            optuna_id = f"{trial_id}-ask{self.asked}"
            point = self.inner.suggest(optuna_id)
            if point is None or point == Searcher.FINISHED:
                break
            self.asked += 1
            self.waiting.append((optuna_id, self._config(point)))
        if not self.waiting:
            return Searcher.FINISHED if self.asked >= self.arms_total else None
        # The first waiting point's kind, up to K of it; the others wait for a later trial.
        kind = self.key(self.waiting[0][1])
        chosen = [w for w in self.waiting if self.key(w[1]) == kind][:self.pack]
        self.waiting = [w for w in self.waiting if w not in chosen]
        self.packs[trial_id] = [optuna_id for optuna_id, _ in chosen]
        return packing.packed([config for _, config in chosen])

    def _config(self, point: dict) -> dict:
        config = copy.deepcopy(self.base)
        for path, value in flatten(point).items():
            set_path(config, path, value)
        return self.canonical(config)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        for k in range(len(self.packs.get(trial_id, []))):
            value = result.get(packing.arm_metric(packing.arm_key(k), self.metric))
            if value is not None:
                self.latest.setdefault(trial_id, {})[k] = float(value)
            if result.get(packing.arm_metric(packing.arm_key(k), packing.ARM_FAILED_METRIC)):
                self.failed.setdefault(trial_id, set()).add(k)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if result:
            self.on_trial_result(trial_id, result)
        failed = self.failed.pop(trial_id, set())
        for k, optuna_id in enumerate(self.packs.pop(trial_id, [])):
            value = self.latest.get(trial_id, {}).get(k)
            if not error and k not in failed and value is not None and math.isfinite(value):
                self.inner.on_trial_complete(optuna_id, {self.metric: value})
            else:  # the arm failed (or the whole pack did): Optuna learns it as a failure
                self.inner.on_trial_complete(optuna_id, None, error=True)
        self.latest.pop(trial_id, None)

    def save(self, checkpoint_path: str) -> None:
        self.inner.save(checkpoint_path + ".inner")
        state = {k: v for k, v in self.__dict__.items() if k not in ("inner", "canonical", "key")}
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        self.inner.restore(checkpoint_path + ".inner")
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
