"""Packed arms: one trial that trains several configs ("arms") side by side, each its own run.

A search with `tune.pack` groups the points that its trainable says may share a trial
(`Packing.key`) into packs of up to K. A packed trial's config is `{ARMS_KEY: [arm configs]}`;
the trainable's `train_loop` reads its arms with `arms_of(config)`, and its context names each
arm's id and run (`TrialContext.arms`). An unpacked trial's config is the arm's config itself.
Importing this module imports nothing beyond the standard library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

ARMS_KEY = "paceray_arms"  # a packed trial's config: {ARMS_KEY: [the arms' configs]}


def arm_key(index: int) -> str:
    """An arm's key within its trial: a0, a1, ... (a trial of one arm is a0)."""
    return f"a{index}"


def arm_trial_id(trial_id: str, index: int) -> str:
    """An arm's id, `<tune trial id>-a<k>`: its runs' paceray.trial_id and run name carry it."""
    return f"{trial_id}-{arm_key(index)}"


def is_packed(config: Mapping[str, Any]) -> bool:
    """Whether a trial trains several arms. A pack of one arm is an ordinary trial: its run is
    named by the trial id, untagged, its checkpoint laid out as any unpacked trial's."""
    return isinstance(config, Mapping) and ARMS_KEY in config and len(config[ARMS_KEY]) > 1


def arms_of(config: Mapping[str, Any]) -> list[dict]:
    """The configs a trial trains: its arms' if packed, else its own."""
    return [dict(c) for c in config[ARMS_KEY]] if ARMS_KEY in config else [dict(config)]


def packed(configs: list[dict]) -> dict:
    return {ARMS_KEY: list(configs)}


@dataclass(frozen=True)
class Arm:
    """One arm of a trial, as its workers are told it: its key (a0..), its id (the arm's
    `paceray.trial_id`) and the MLflow run its rank 0 logs into."""

    key: str
    trial_id: str
    run_id: Optional[str]


@dataclass(frozen=True)
class Packing:
    """What a trainable that trains packs declares (`Trainable.packing`).

    key       `key(config) -> str`: configs with the same key may share a trial (the same data,
              model, steps and seed: what the pack shares); configs differing in it never do
    max_pack  `max_pack(config) -> int`: the most arms of this config one trial should hold, from
              its memory estimate (`tune.pack: auto`)
    """

    key: Callable[[dict], str]
    max_pack: Callable[[dict], int] = lambda config: 8


# ------------------------------------------------------------------ what a packed trial reports
BEST_ARM_KEY = "paceray_best_arm"  # in a packed trial's reports: the arm whose metric the report carries
ARM_FAILURES_KEY = "paceray_arm_failures"  # in rank 0's return value: arm key -> why it failed in-band
ARM_FAILED_METRIC = "paceray_failed"  # `a<k>/paceray_failed: 1` in a pack's reports once arm a<k> has failed
ARM_STOPPED_KEY = "paceray_arm_stopped"  # in rank 0's return value: arm key -> the step the arm scheduler stopped it


def arm_metric(arm: str, key: str) -> str:
    """An arm's own value of `key` in its pack's reports (`a1/eval/fid`)."""
    return f"{arm}/{key}"


def pack_report(by_arm: Mapping[str, Mapping[str, Any]], metric: str, mode: str, failed: tuple = ()) -> dict:
    """A packed trial's report from its arms' (live arms only, all holding `metric`): the search
    metric is the best arm's (Tune ranks and checkpoints a pack by its best arm), named in
    BEST_ARM_KEY; every arm's own values are kept under its prefix; the arms in `failed` are
    flagged (ARM_FAILED_METRIC), so a searcher told the pack's results knows them."""
    finite = [arm for arm, values in by_arm.items() if math.isfinite(float(values[metric]))] or list(by_arm)
    best = (min if mode == "min" else max)(finite, key=lambda arm: float(by_arm[arm][metric]))
    report = {arm_metric(arm, k): v for arm, values in by_arm.items() for k, v in values.items()}
    report.update(by_arm[best])
    report[BEST_ARM_KEY] = best
    report.update({arm_metric(arm, ARM_FAILED_METRIC): 1 for arm in failed})
    return report
